# Helpers to register tests. Every test runs with one thread per process (CI has 2 cores and the
# distributed suites start up to 8 ranks).
include(GoogleTest)

set(MOE_TEST_ENV "OMP_NUM_THREADS=1;OPENBLAS_NUM_THREADS=1;MOE_NUM_THREADS=1;MOE_LOG_LEVEL=warn")
find_program(MOE_ENV_PROGRAM env REQUIRED)
# Sanitizer builds: runtime options and suppression files (cmake/MoeSanitizers.cmake; empty otherwise).
list(APPEND MOE_TEST_ENV ${MOE_SANITIZER_ENV})
set(MOE_MPI_ENV "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMPI_MCA_rmaps_base_oversubscribe=1;OMPI_MCA_btl_vader_single_copy_mechanism=none")

# moe_add_gtest(<name> SOURCES <files...> LABELS <labels...>): one GoogleTest executable whose
# tests CTest lists one by one.
function(moe_add_gtest name)
  cmake_parse_arguments(ARG "" "" "SOURCES;LABELS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE moe_test_support GTest::gtest_main)
  moe_set_warnings(${name})
  # gtest_discover_tests flattens list-valued PROPERTIES (CMake 3.25 writes `ENVIRONMENT a b c`, so
  # only the first variable was set and the rest became bogus property names): the environment goes
  # through the test command instead, `env VAR=value ... <test>`, for discovery and every test. For
  # the same reason a gtest executable takes one label.
  set_property(TARGET ${name} PROPERTY CROSSCOMPILING_EMULATOR ${MOE_ENV_PROGRAM} ${MOE_TEST_ENV})
  gtest_discover_tests(${name} DISCOVERY_MODE PRE_TEST DISCOVERY_TIMEOUT 120
    PROPERTIES LABELS "${ARG_LABELS}" TIMEOUT 600)
endfunction()

# moe_add_gpu_test(<name> SOURCES <files...>): a GoogleTest executable with a main that exits 77
# when no GPU is present, registered as one CTest test that reports SKIPPED then.
function(moe_add_gpu_test name)
  cmake_parse_arguments(ARG "" "" "SOURCES;LABELS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE moe_test_support moe_gpu_test_main)
  moe_set_warnings(${name})
  add_test(NAME ${name} COMMAND ${name})
  set_tests_properties(${name} PROPERTIES SKIP_RETURN_CODE 77 LABELS "cuda;${ARG_LABELS}"
    ENVIRONMENT "${MOE_TEST_ENV}" TIMEOUT 900)
endfunction()

# moe_add_mpi_test(<name> NP <n> COMMAND <target> [ARGS ...] LABELS ...): runs under mpiexec.
function(moe_add_mpi_test name)
  cmake_parse_arguments(ARG "" "NP;TARGET" "ARGS;LABELS" ${ARGN})
  add_test(NAME ${name}
    COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${ARG_NP} --oversubscribe --allow-run-as-root
            --bind-to none ${MPIEXEC_PREFLAGS} $<TARGET_FILE:${ARG_TARGET}> ${ARG_ARGS})
  set_tests_properties(${name} PROPERTIES LABELS "dist;${ARG_LABELS}" PROCESSORS 2
    ENVIRONMENT "${MOE_TEST_ENV};${MOE_MPI_ENV}" TIMEOUT 600)
endfunction()
