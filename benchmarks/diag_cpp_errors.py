"""Why an argument error of the C++ CPU routing op can kill the process: build facts, then each error in its own
process.

``torch.ops.moe_fastmask_C.route_cpu`` checks its arguments with ``TORCH_CHECK`` before any parallel work, so a bad
argument should become a ``RuntimeError``; a process that dies on a signal instead points at the toolchain (the C++
runtime, the unwinder or the OpenMP runtime the library resolves to differ from torch's), at how the exception
crosses the library boundary, or at state left behind by what ran before (``torch.library.opcheck``). One run prints:

1. the toolchain: ``gcc``/``g++``/``c++`` versions, the compiler torch's extension builder uses, torch's C++ ABI flag
   and the compiler torch was built with;
2. the library: ``ldd`` of the built ``moe_fastmask_C`` library and of torch's ``libtorch_cpu``, the compilers named
   in their ``.comment`` sections, the newest ``GLIBCXX``/``GOMP`` symbol versions the library needs, and which
   ``libstdc++``/``libgcc_s``/OpenMP files one process really maps once torch and the library are loaded (two OpenMP
   runtimes in one process show up here);
3. one line per case, each case run in a fresh interpreter: every argument error of the op called plainly, through
   ``.default``, with one OpenMP thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``), after a multi-threaded
   call, after ``torch.library.opcheck`` (whole, and each of its sub-tests alone), with C++ stack traces on; and, from
   a probe library built with the same flags, a ``TORCH_CHECK`` thrown outside vs inside ``at::parallel_for``, a
   plain ``std::runtime_error``, and (for comparison: undefined behaviour, expected to abort) an exception leaving a
   raw ``#pragma omp`` region; then the failing test itself under pytest (alone, after its file's other opcheck
   tests, and after the whole file before it; started first, in the background). A case that dies shows its
   stderr, with the native backtrace the probe's signal handler prints.

    python benchmarks/diag_cpp_errors.py        # from the repository root; under 2 minutes (most of it compiling)

Exit status 0 when no case died on a signal, 1 otherwise.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A probe library, compiled with the routing library's flags: throws from the places an op can throw from, and a
# signal handler printing the native stack (installed before faulthandler, which chains to it).
PROBE_SOURCE = r"""
#include <ATen/Parallel.h>
#include <torch/all.h>
#include <torch/library.h>

#include <execinfo.h>
#include <signal.h>
#include <unistd.h>

#include <stdexcept>

namespace {
void on_fatal_signal(int sig) {
  static const char header[] = "\n[probe] native backtrace at the signal:\n";
  void* frames[96];
  const int n = backtrace(frames, 96);
  ssize_t ignored = write(2, header, sizeof(header) - 1);
  (void)ignored;
  backtrace_symbols_fd(frames, n, 2);
  signal(sig, SIG_DFL);
  raise(sig);
}

void install_backtrace() {
  for (int sig : {SIGSEGV, SIGABRT, SIGBUS, SIGILL, SIGFPE}) signal(sig, on_fatal_signal);
}

// where: 0 TORCH_CHECK before any parallel work; 1 TORCH_CHECK inside at::parallel_for (torch catches it in the
// region and rethrows after); 2 std::runtime_error before any parallel work; 3 an exception leaving a raw OpenMP
// region (undefined behaviour: std::terminate)
void throw_from(const at::Tensor& x, int64_t where) {
  const int64_t n = std::max<int64_t>(x.numel(), 64);
  if (where == 0) TORCH_CHECK(false, "probe: argument error before the parallel region");
  if (where == 1) {
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      TORCH_CHECK(begin < 0, "probe: argument error inside at::parallel_for");
    });
  }
  if (where == 2) throw std::runtime_error("probe: std::runtime_error before the parallel region");
#ifdef _OPENMP
  if (where == 3) {
#pragma omp parallel for
    for (int64_t i = 0; i < n; ++i) {
      if (i >= 0) throw std::runtime_error("probe: exception leaving an OpenMP region");
    }
  }
#endif
}
}  // namespace

TORCH_LIBRARY(moe_fastmask_probe, m) {
  m.def("throw_from(Tensor x, int where) -> ()");
  m.impl("throw_from", torch::kCPU, &throw_from);
  m.def("install_backtrace() -> ()", &install_backtrace);
}
"""

PRELUDE = """
import faulthandler, os, sys, torch
PROBE = os.environ.get("DIAG_PROBE_LIB")
if PROBE:
    torch.ops.load_library(PROBE)
    torch.ops.moe_fastmask_probe.install_backtrace()
faulthandler.enable()
from moe_fastmask.ops import cpp_route
cpp_route.build()
op = torch.ops.moe_fastmask_C.route_cpu
g = torch.Generator().manual_seed(0)
logits = torch.randn(9, 16, generator=g)
weights, ids = torch.empty(9, 3), torch.empty(9, 3, dtype=torch.int64)
counts = torch.zeros(1, 16, dtype=torch.int64)
bias = torch.randn(16, generator=g)
SIGMOID = (weights, ids, counts, logits, None, None, True, 2, bias, 4, 2, 2.5)
CHOSEN = (weights, ids, counts, logits, None, None, False, 1, None, 1, 1, 1.0)
def expect(match, *args, call=None):
    try:
        (call or op)(*args)
    except RuntimeError as exc:
        assert match in str(exc), str(exc)
        print("raised:", str(exc).splitlines()[0][:90], flush=True)
        return
    raise SystemExit("no error raised")
def parallel_call():
    big = torch.randn(8192, 64, generator=g)
    w, i = torch.empty(8192, 8), torch.empty(8192, 8, dtype=torch.int64)
    op(w, i, torch.zeros(1, 64, dtype=torch.int64), big, None, None, True)
    print("threads:", torch.get_num_threads(), flush=True)
"""

SCORING3 = "expect('scoring', weights, ids, counts, logits, None, None, False, 3, None, 1, 1, 1.0)"

# name -> (body, extra environment)
CASES: dict[str, tuple[str, dict]] = {
    "dtype (first check)": ("expect('topk_weights', weights.double(), ids, counts, logits, None, None, False)", {}),
    "top_k": ("expect('top_k', torch.empty(9, 17), torch.empty(9, 17, dtype=torch.int64), counts, logits, None, None, "
              "False)", {}),
    "keep dtype": (
        "expect('keep', weights, ids, counts, logits, torch.ones(1, 16, dtype=torch.int32), None, False)", {}),
    "counts shape": ("expect('counts', weights, ids, torch.zeros(1, 15, dtype=torch.int64), logits, None, None, False)",
                     {}),
    "scoring=3": (SCORING3, {}),
    "scoring=-1": ("expect('scoring', weights, ids, counts, logits, None, None, False, -1, None, 1, 1, 1.0)", {}),
    "scoring=3, counts=None": (
        "expect('scoring', weights, ids, None, logits, None, None, False, 3, None, 1, 1, 1.0)", {}),
    "bias without sigmoid": ("expect('bias', weights, ids, counts, logits, None, None, False, 0, bias, 1, 1, 1.0)", {}),
    "n_group": ("expect('n_group', weights, ids, counts, logits, None, None, False, 2, None, 3, 1, 1.0)", {}),
    "topk_group": ("expect('topk_group', weights, ids, counts, logits, None, None, False, 2, None, 4, 5, 1.0)", {}),
    "scoring=3 via .default": (f"op = op.default\n{SCORING3}", {}),
    "scoring=3, set_num_threads(1)": (f"torch.set_num_threads(1)\n{SCORING3}", {}),
    "scoring=3, OMP_NUM_THREADS=1": (SCORING3, {"OMP_NUM_THREADS": "1"}),
    "scoring=3, C++ stack traces on": (SCORING3, {"TORCH_SHOW_CPP_STACKTRACES": "1"}),
    "multi-threaded call, then scoring=3": (f"parallel_call()\n{SCORING3}", {}),
    "opcheck x2, then scoring=3 (the test)": (
        f"op = op.default\ntorch.library.opcheck(op, SIGMOID)\ntorch.library.opcheck(op, CHOSEN)\n{SCORING3}", {}),
    "opcheck x2, 1 thread, then scoring=3": (
        f"torch.set_num_threads(1)\nop = op.default\ntorch.library.opcheck(op, SIGMOID)\n"
        f"torch.library.opcheck(op, CHOSEN)\n{SCORING3}", {}),
    "opcheck x2, then n_group": (
        "op = op.default\ntorch.library.opcheck(op, SIGMOID)\ntorch.library.opcheck(op, CHOSEN)\n"
        "expect('n_group', weights, ids, counts, logits, None, None, False, 2, None, 3, 1, 1.0)", {}),
    "opcheck x2, then dtype (first check)": (
        "op = op.default\ntorch.library.opcheck(op, SIGMOID)\ntorch.library.opcheck(op, CHOSEN)\n"
        "expect('topk_weights', weights.double(), ids, counts, logits, None, None, False)", {}),
    **{
        f"opcheck {name} only, then scoring=3": (
            f"op = op.default\ntorch.library.opcheck(op, SIGMOID, test_utils={name!r})\n{SCORING3}", {})
        for name in ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    },
    "route opcheck + torch.compile (cpp), then scoring=3": (
        "import warnings\nfrom moe_fastmask import route\n"
        "x = torch.randn(6, 16, generator=g).requires_grad_()\n"
        "keep = torch.ones(2, 16, dtype=torch.bool)\ngroup = torch.tensor([0, 1, -1, 1, 0, 1])\n"
        "c = torch.zeros(2, 16, dtype=torch.int64)\nb = torch.randn(16, generator=g) * 0.1\n"
        "torch.library.opcheck(torch.ops.moe_fastmask.route.default, "
        "(x, 3, keep, group, c, True, 'cpp', 'sigmoid', b, 4, 2, 2.5))\n"
        "step = lambda x, c: route(x, 3, keep, group, c, True, 'cpp', scoring='sigmoid', bias=b, n_group=4, "
        "topk_group=2, scale=2.5)\n"
        "with warnings.catch_warnings():\n    warnings.simplefilter('ignore')\n"
        "    w, _ = torch.compile(step, fullgraph=True, backend='aot_eager')(x, c)\n"
        "w.float().pow(2).sum().backward()\n"
        f"{SCORING3}", {}),
    "probe: TORCH_CHECK outside parallel_for": (
        "expect('before the parallel', torch.zeros(4), 0, call=torch.ops.moe_fastmask_probe.throw_from)", {}),
    "probe: TORCH_CHECK inside parallel_for": (
        "expect('inside at::parallel_for', torch.zeros(4), 1, call=torch.ops.moe_fastmask_probe.throw_from)", {}),
    "probe: std::runtime_error outside": (
        "expect('std::runtime_error', torch.zeros(4), 2, call=torch.ops.moe_fastmask_probe.throw_from)", {}),
    "probe: opcheck x2, then TORCH_CHECK outside": (
        "torch.library.opcheck(op.default, SIGMOID)\ntorch.library.opcheck(op.default, CHOSEN)\n"
        "expect('before the parallel', torch.zeros(4), 0, call=torch.ops.moe_fastmask_probe.throw_from)", {}),
    "probe: throw out of omp region (UB, aborts)": (
        "expect('OpenMP region', torch.zeros(4), 3, call=torch.ops.moe_fastmask_probe.throw_from)", {}),
}

PYTEST_CASE = "tests/test_route_variants.py::test_cpp_op_opcheck_with_variants"
# the test alone; after the file's other opcheck / compile tests; after every test before it in the file (-x: the
# run stops at the first failure, so a crash is the last thing it prints)
PYTEST_RUNS = {
    "pytest: the test alone": [PYTEST_CASE],
    "pytest: -k opcheck of its file": [PYTEST_CASE.split("::")[0], "-k", "opcheck"],
    "pytest: its whole file, -x": [PYTEST_CASE.split("::")[0], "-x"],
}


def _run(cmd: list[str], timeout: float = 30, **kwargs) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"<{type(exc).__name__}: {exc}>"
    return (proc.stdout + proc.stderr).strip()


def _say(title: str, text: str) -> None:
    lines = text.splitlines() or [""]
    print(f"{title}: {lines[0]}" if len(lines) == 1 else f"{title}:\n    " + "\n    ".join(lines), flush=True)


def _env() -> dict:
    # the subprocesses import moe_fastmask as this process does (installed, or from the repository root)
    env = dict(os.environ)
    import moe_fastmask

    root = str(Path(moe_fastmask.__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def toolchain_facts() -> None:
    import torch

    print(f"torch {torch.__version__}, python {sys.version.split()[0]}, {sys.platform}", flush=True)
    for compiler in ("gcc", "g++", "c++", os.environ.get("CXX", "")):
        if compiler and shutil.which(compiler):
            _say(f"{compiler} --version", _run([compiler, "--version"]).splitlines()[0])
            _say(f"{compiler} resolves to", os.path.realpath(shutil.which(compiler)))
    _say("extension builder's compiler (CXX or c++)", os.environ.get("CXX", "c++"))
    _say("torch._C._GLIBCXX_USE_CXX11_ABI", str(torch._C._GLIBCXX_USE_CXX11_ABI))
    config = torch.__config__.show()
    _say("torch built with", "\n".join(ln.strip() for ln in config.splitlines()
                                      if re.search(r"compiler|C\+\+ Version|CXX_FLAGS|OpenMP|GCC", ln, re.I))[:3000])
    _say("torch.__config__.parallel_info", "\n".join(torch.__config__.parallel_info().splitlines()[:8]))


def library_facts(lib: str, probe: str) -> None:
    import torch

    torch_lib = Path(torch.__file__).parent / "lib"
    libtorch_cpu = torch_lib / "libtorch_cpu.so"
    pattern = re.compile(r"stdc\+\+|gcc_s|gomp|iomp|omp|c10|torch")
    _say(f"ldd {lib}", _run(["ldd", lib]))
    _say(f"ldd {libtorch_cpu} (C++/OpenMP runtimes)",
         "\n".join(ln for ln in _run(["ldd", str(libtorch_cpu)]).splitlines() if pattern.search(ln)))  # fmt: skip
    _say("OpenMP / C++ runtimes bundled in torch/lib",
         " ".join(sorted(p.name for p in torch_lib.iterdir() if re.search(r"gomp|iomp|stdc|gcc", p.name))) or "none")
    for name, path in (("route library", lib), ("libtorch_cpu", str(libtorch_cpu))):
        comment = _run(["readelf", "-p", ".comment", path]) if shutil.which("readelf") else "<no readelf>"
        _say(f"{name} .comment (compilers)", "\n".join(sorted({ln.split("]", 1)[-1].strip()
                                                              for ln in comment.splitlines() if "]" in ln})))
    if shutil.which("objdump"):
        symbols = _run(["objdump", "-T", lib])
        for tag in ("GLIBCXX_", "CXXABI_", "GOMP_", "GCC_"):
            versions = sorted(set(re.findall(rf"\b({tag}[0-9.]+)", symbols)), key=lambda v: [int(x) for x in
                                                                                          re.findall(r"\d+", v)])
            _say(f"route library needs {tag}*", " ".join(versions[-3:]) or "none")
    # what one process really maps with torch, the route library and the probe loaded
    code = "import re, torch\nfrom moe_fastmask.ops import cpp_route\ncpp_route.build()\n"
    if probe:
        code += f"torch.ops.load_library({probe!r})\n"
    code += ("maps = sorted({ln.split()[-1] for ln in open('/proc/self/maps') if len(ln.split()) >= 6 and "
             "re.search(r'stdc[+][+]|gcc_s|gomp|iomp|libomp|moe_fastmask', ln)})\nprint('\\n'.join(maps))")
    _say("mapped in one process (torch + route library + probe)", _run([sys.executable, "-c", code], timeout=60,
                                                                       env=_env()))


def build_probe(directory: Path) -> str:
    """Compile the probe library with the routing library's flags; returns its path ("" on failure, said)."""
    from torch.utils import cpp_extension

    from moe_fastmask.ops import cpp_route

    try:
        cpp_extension.load_inline(
            name="moe_fastmask_probe", cpp_sources=[PROBE_SOURCE], extra_cflags=list(cpp_route.EXTRA_CFLAGS),
            extra_ldflags=cpp_route.link_flags(), build_directory=str(directory), is_python_module=False,
            verbose=False,
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - the cases of the real op still run
        _say("probe library build FAILED (probe cases skipped)", f"{type(exc).__name__}: {str(exc)[-1500:]}")
        return ""
    found = sorted(directory.glob("moe_fastmask_probe*.so"))
    return str(found[0]) if found else ""


def run_case(name: str, body: str, extra_env: dict, probe: str) -> tuple[str, int, str, str]:
    env = {**_env(), **extra_env}
    if probe:
        env["DIAG_PROBE_LIB"] = probe
    try:
        proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(body)], capture_output=True, text=True,
                              timeout=90, env=env)  # fmt: skip
        return name, proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        return name, 124, str(exc.stdout or ""), "timed out after 90 s"


def describe(rc: int) -> str:
    if rc == 0:
        return "ok"
    if rc < 0:
        return f"DIED {signal.Signals(-rc).name}"
    return f"rc={rc}"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Exit status 0 when no case died "
                                     "on a signal, 1 otherwise.")
    parser.parse_args(argv)  # no options: --help says what a run does before it compiles anything
    begin = time.perf_counter()
    try:
        import moe_fastmask  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO))
    toolchain_facts()
    from moe_fastmask.ops import cpp_route

    # the pytest runs start now, in the background (they build the library themselves, under its build lock)
    pytests = {}
    if (REPO / PYTEST_CASE.split("::")[0]).is_file():
        for title, cmd in PYTEST_RUNS.items():
            pytests[title] = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *cmd], stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, cwd=REPO, env=_env(),
            )  # fmt: skip
    # the routing library (cached after the first build) and the probe compile at the same time
    probe_dir = Path(tempfile.mkdtemp(prefix="moe_fastmask_probe_"))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        route_build = pool.submit(_run, [sys.executable, "-c", "from moe_fastmask.ops import cpp_route\n"
                                         "print(cpp_route.build())"], 110, env=_env())  # fmt: skip
        probe_build = pool.submit(build_probe, probe_dir)
        lib = route_build.result().strip().splitlines()[-1] if route_build.result() else ""
        probe = probe_build.result()
    if not lib.endswith(".so"):
        lib = str(cpp_route._library_path(cpp_route.build_dir()))
    print(f"built in {time.perf_counter() - begin:.0f} s: {lib}; probe {probe or 'unavailable'}", flush=True)
    library_facts(lib, probe)

    cases = {k: v for k, v in CASES.items() if probe or not k.startswith("probe")}
    print(f"\n{'case':56s} {'result':14s} output", flush=True)
    died = []
    workers = max(1, min(8, (os.cpu_count() or 2) // 2))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(run_case, name, body, env, probe) for name, (body, env) in cases.items()]
        for future in futures:
            name, rc, out, err = future.result()
            last = out.strip().splitlines()[-1][:80] if out.strip() else ""
            print(f"{name:56s} {describe(rc):14s} {last}", flush=True)
            if rc != 0:
                if rc < 0 and "UB" not in name:
                    died.append(name)
                print("    " + "\n    ".join(err.strip().splitlines()[-40:]), flush=True)
    # the failing test itself, alone and after the tests before it
    deadline = begin + 110
    for title, proc in pytests.items():
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            print(f"{title:56s} {'unfinished':14s} (stopped at {time.perf_counter() - begin:.0f} s)", flush=True)
            print("    " + "\n    ".join(out.strip().splitlines()[-6:]), flush=True)
            continue
        summary = out.strip().splitlines()[-1][:80] if out.strip() else ""
        print(f"{title:56s} {describe(proc.returncode):14s} {summary}", flush=True)
        if proc.returncode != 0:
            print("    " + "\n    ".join(out.strip().splitlines()[-30:]), flush=True)
            if proc.returncode < 0 or "Fatal Python error" in out:
                died.append(title)
    shutil.rmtree(probe_dir, ignore_errors=True)
    print(f"\n{len(died)} case(s) died on a signal{': ' + '; '.join(died) if died else ''}; "
          f"{time.perf_counter() - begin:.0f} s", flush=True)
    return 1 if died else 0


if __name__ == "__main__":
    raise SystemExit(main())
