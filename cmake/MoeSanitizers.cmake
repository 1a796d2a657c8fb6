# Sanitizer and fuzzing builds (docs/reliability.md, "Sanitizers" and "Fuzzed readers").
#
# MOE_SANITIZERS: a comma list for -fsanitize= applied to every C/C++ target of the build (library,
# tests, tools), e.g. "address,undefined" (what scripts/run_sanitizers.sh configures as build-asan)
# or "thread". Empty (the default): no sanitizer. Undefined behaviour aborts at the first report
# (-fno-sanitize-recover) so a test cannot pass over it. The CUDA backend is not built (nvcc code
# cannot be instrumented): MOE_CUDA AUTO becomes OFF, MOE_CUDA=ON is refused.
#
# With address in MOE_SANITIZERS the fuzz targets of tests/fuzz are built too (MOE_FUZZ_TARGETS), and
# CTest runs each for MOE_FUZZ_SECONDS (label fuzz).
#
# MOE_SANITIZER_ENV: the environment the tests run under (appended to MOE_TEST_ENV by
# MoeTesting.cmake): the runtime options and the committed suppression files in tests/sanitizers/.
set(MOE_SANITIZERS "" CACHE STRING "Sanitizers for every target: a -fsanitize= list (address,undefined | thread), empty for none")
set(MOE_FUZZ_SECONDS 20 CACHE STRING "Seconds each fuzz target runs under CTest (label fuzz)")
set(MOE_FUZZ_TARGETS OFF)
set(MOE_SANITIZER_ENV "")

if(MOE_SANITIZERS)
  string(REPLACE "," ";" _moe_san_list "${MOE_SANITIZERS}")
  foreach(s ${_moe_san_list})
    if(NOT s MATCHES "^(address|undefined|thread|leak)$")
      message(FATAL_ERROR "MOE_SANITIZERS: unknown sanitizer '${s}' in '${MOE_SANITIZERS}' "
                          "(expected a comma list of address, undefined, thread, leak)")
    endif()
  endforeach()
  if("thread" IN_LIST _moe_san_list AND ("address" IN_LIST _moe_san_list OR "leak" IN_LIST _moe_san_list))
    message(FATAL_ERROR "MOE_SANITIZERS='${MOE_SANITIZERS}': thread cannot be combined with address or leak "
                        "(configure a separate build for ThreadSanitizer)")
  endif()
  if(MOE_CUDA STREQUAL "ON")
    message(FATAL_ERROR "MOE_SANITIZERS='${MOE_SANITIZERS}' needs MOE_CUDA=OFF or AUTO: device code cannot be "
                        "instrumented (use compute-sanitizer for the CUDA backend, docs/gpu.md)")
  endif()
  set(MOE_CUDA OFF)
  set(MOE_NCCL OFF)

  set(_moe_san_flags -fsanitize=${MOE_SANITIZERS} -fno-omit-frame-pointer -g)
  if("undefined" IN_LIST _moe_san_list)
    list(APPEND _moe_san_flags -fno-sanitize-recover=undefined)
  endif()
  add_compile_options("$<$<COMPILE_LANGUAGE:C,CXX>:${_moe_san_flags}>")
  if("address" IN_LIST _moe_san_list)
    set(MOE_FUZZ_TARGETS ON)
  endif()
  add_link_options(-fsanitize=${MOE_SANITIZERS})

  set(_moe_supp ${CMAKE_CURRENT_LIST_DIR}/../tests/sanitizers)
  get_filename_component(_moe_supp "${_moe_supp}" ABSOLUTE)
  # abort_on_error: a report ends the process with a signal CTest counts as a failure; the
  # suppression files name every entry's reason.
  set(MOE_ASAN_OPTIONS "abort_on_error=1:detect_stack_use_after_return=0:strict_string_checks=1:detect_odr_violation=0")
  list(APPEND MOE_SANITIZER_ENV
    "ASAN_OPTIONS=${MOE_ASAN_OPTIONS}"
    "LSAN_OPTIONS=suppressions=${_moe_supp}/lsan.supp:print_suppressions=0"
    "UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:suppressions=${_moe_supp}/ubsan.supp"
    "TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1:suppressions=${_moe_supp}/tsan.supp")
  message(STATUS "libmoecore: sanitizers ${MOE_SANITIZERS} (CUDA off; tests run with ${_moe_supp}/*.supp)")
endif()

