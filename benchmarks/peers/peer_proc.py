"""What the CPU peers read about their own process from /proc: resident memory (current, and the
peak since a reset), the BLAS libraries mapped in, the CPU model. Shared by torch_moe_layer.py and
torch_moe_gpt.py (imported from the scripts' own folder)."""
import os


def reset_rss_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def blas_in_use():
    """The BLAS shared objects mapped into this process (torch on Debian reaches its BLAS through
    the libblas.so.3 alternative)."""
    libs = set()
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            if "blas" in path or "mkl" in path:
                libs.add(os.path.realpath(path))
    return sorted(libs)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"
