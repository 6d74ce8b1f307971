"""`--weights auto`, decided by measurement: which of a GGUF file and its copies (F16, BF16, Q8_0)
runs fastest on this machine, for prompts (score, judge, tag, embed) and for batched generation
steps (generate, respond), among those whose log-probabilities stay close to the file's own.

Instruction-set flags misled twice (an AVX-512 build made F16 slower on a Zen 4 without BF16;
ggml's AMX kernels crashed on a Xeon that reports AMX), so each candidate is run instead: in a
subprocess that a crashing kernel cannot take down, on a fixed text, timing a prompt and a
generation step of ROWS sequences, and comparing its log-probabilities with the file's. A
candidate that crashes, fails to load or drifts past the budget is never chosen. The result is
cached per model file, CPU and llama.cpp build, and measured again when any of them changes;
`magpie-local doctor` prints it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

CANDIDATES = ("file", "f16", "bf16", "q8_0")
AUTO_COPY_MAX_BYTES = 1 << 30  # auto considers 16-bit copies up to this size (the default model's: 258 MiB)
# Largest mean and max |log-prob - the file's| (nats per token) a copy may have. On the default
# model's probe text F16 and BF16 copies drift 0.06-0.07 / 0.4, Q8_0 0.08-0.09 / 0.45, Q4_0 0.83 / 2.9
# (docs/throughput.md).
DRIFT_MEAN, DRIFT_MAX = 0.15, 1.5
MARGIN = 1.10  # speeds within this factor are a tie (runs here vary by ~10%): the least drift wins
ROWS, STEPS, REPEATS = 32, 6, 2  # the step: 32 sequences (generate's --parallel on 2 cores)
# How step_rate times a step: the lanes of LlamaCppBackend.stream side by side (figures cached
# under another method are measured again).
STEP_METHOD = "lanes side by side"
CRASH_SWITCH = "MAGPIE_LOCAL_PROBE_CRASH"  # test switch: this candidate's probe dies as a bad kernel would
FILE_TYPES = {"f16": 1, "q8_0": 7, "bf16": 32}  # general.file_type of a file already in that type
TEXT = ("The committee met on a grey Tuesday morning to decide how the new library would be funded. "
        "Some members argued for a small tax on property, others for private donors, and a few wanted "
        "to sell the old building on Market Street. After two hours they agreed on a plan: the city "
        "would pay for the land, a foundation would pay for the books, and volunteers would run the "
        "reading room on weekends. def area(radius): return 3.14159 * radius ** 2  # a circle's area. "
        "Water boils at 100 degrees Celsius at sea level, and at a lower temperature on a mountain, "
        "because the air pressure is lower there. Translate into French: where is the train station?")


@dataclass
class Measured:
    kind: str  # "file" or the weight type of a copy
    size: int  # bytes on disk
    prompt_tok_s: float | None = None  # log-probabilities of the text, one decode
    step_tok_s: float | None = None  # a generation step of ROWS sequences
    drift_mean: float | None = None  # against the file (None for the file)
    drift_max: float | None = None
    failure: str | None = None  # why it can never be chosen

    @property
    def crashed(self) -> bool:
        """Its run killed its process (SIGILL, SIGSEGV): the build is unsafe for it."""
        return bool(self.failure and self.failure.startswith("crashed"))


@dataclass
class WeightsChoice:
    model: str
    machine: dict  # what the choice holds for: CPU, llama.cpp version and build
    measured: list[Measured]
    prompt: str  # the kind `--weights auto` runs prompts on (score, judge, tag, embed)
    step: str  # ... and generation steps on (generate, respond)
    seconds: float  # how long measuring took
    cached: bool = False  # read from the cache rather than measured now

    def kind_for(self, work: str) -> str | None:
        """The copy's weight type for `work` ("prompt" or "step"), None for the file."""
        kind = self.prompt if work == "prompt" else self.step
        return None if kind == "file" else kind


def copy_wanted(model, weights: str, work: str = "prompt", announce=None) -> str | None:
    """The weight type of the copy `--weights` runs `model` on ("f16", "bf16", "q8_0"), or None
    for the file.

    auto: on a CPU (llama.cpp offloading nothing), for a GGUF file whose 16-bit copy stays under
    AUTO_COPY_MAX_BYTES, whatever measured fastest here for `work` ("prompt": score, judge, tag,
    embed; "step": generate, respond) among the file and its copies that run and stay close to
    the file's log-probabilities (tune.py, cached per CPU and build; `magpie-local doctor`)."""
    if weights == "file" or model.kind != "gguf":
        return None
    from .convert import COPY_TYPES

    if weights in COPY_TYPES:
        return weights
    if auto_skips(model):
        return None
    return weights_choice(model, announce=announce).kind_for(work)


def auto_skips(model) -> str | None:
    """Why `--weights auto` runs `model` as it is without measuring, or None where it measures."""
    if model.kind != "gguf":
        return "not a GGUF file (copies are for llama.cpp)"
    from .gguf import read_gguf
    from .llama_lib import llama_cpp

    if llama_cpp().llama_supports_gpu_offload():
        return "llama.cpp runs on the GPU here"
    info = read_gguf(model.path, tensors=True)
    if info.get(f"{info.architecture}.attention.causal") is False:
        return "an encoder (embeddings only): the measurement generates"
    if 2 * info.n_params > AUTO_COPY_MAX_BYTES:
        return f"a 16-bit copy would be larger than {AUTO_COPY_MAX_BYTES >> 20} MiB"
    return None


def cpu_model() -> str:
    """The CPU's model name, as the OS reports it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """The CPU and the llama.cpp build a measurement holds for."""
    from .cpu import default_threads
    from .llama_lib import llama_cpp

    lc = llama_cpp()
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = platform.processor()
    lib = Path(lc.__file__).parent / "lib"  # a rebuild with the same flags is another build
    built = max((f.stat().st_mtime_ns for f in lib.iterdir()), default=0) if lib.is_dir() else 0
    return {"cpu": cpu_model(), "cores": default_threads(), "cpu_flags_sha1": hashlib.sha1(flags.encode()).hexdigest(),
            "llama_cpp": lc.__version__, "build": lc.llama_print_system_info().decode().strip(),
            "library_mtime_ns": built}


def build_features(build: str) -> list[str]:
    """The instruction sets and devices in llama.cpp's system info (`AVX2 = 1 | ...`) that are on."""
    on = [f.split("=")[0].strip() for f in build.split("|") if f.strip().endswith("= 1")]
    return [f for f in on if f.startswith(("AVX", "AMX", "NEON", "SVE", "F16C", "FMA", "BLAS")) or "CUDA" in f
            or "METAL" in f]


def cache_file() -> Path:
    from .backends import cache_dir

    return cache_dir() / "weights-choice.json"


def _key(model, candidates, here: dict) -> str:
    stat = model.path.stat()
    # what the figures depend on; MARGIN applies on reading
    ident = [str(model.path.resolve()), stat.st_size, stat.st_mtime_ns, list(candidates), here,
             DRIFT_MEAN, DRIFT_MAX, ROWS, STEPS, STEP_METHOD, TEXT]
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _read_cache() -> dict:
    try:
        data = json.loads(cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, choice: WeightsChoice) -> None:
    """Keep the measurement; where the cache cannot be written it is measured again next time."""
    from .files import WriteError, write_bytes

    path = cache_file()
    data = _read_cache()
    data[key] = asdict(choice)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(path, json.dumps(data, indent=1).encode())
    except (OSError, WriteError):
        pass


def _from_dict(d: dict) -> WeightsChoice:
    """A cached measurement, chosen from by today's rule (pick)."""
    measured = [Measured(**m) for m in d["measured"]]
    return WeightsChoice(**{**d, "measured": measured, "prompt": pick(measured, "prompt_tok_s"),
                            "step": pick(measured, "step_tok_s"), "cached": True})


def cached_choice(model, candidates=CANDIDATES, here: dict | None = None) -> WeightsChoice | None:
    """The measurement of `model` kept for this CPU and build, if there is one."""
    hit = _read_cache().get(_key(model, candidates, here or machine()))
    try:
        return _from_dict(hit) if hit is not None else None
    except (TypeError, KeyError):
        return None  # an older or damaged entry


@contextmanager
def _measuring():
    """One measurement at a time on this machine: two processes starting at once would time each other
    and delete the copies the other is measuring. The second waits, then finds the first's result."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    path = cache_file().with_suffix(".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:  # an unwritable cache: measured unlocked, and not kept
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def weights_choice(model, *, remeasure: bool = False, candidates=CANDIDATES, announce=None) -> WeightsChoice:
    """What `--weights auto` runs GGUF `model` on here: the cached measurement, or a new one."""
    here = machine()
    if not remeasure and (cached := cached_choice(model, candidates, here)) is not None:
        return cached
    with _measuring():
        if not remeasure and (cached := cached_choice(model, candidates, here)) is not None:
            return cached  # measured by another process while this one waited
        key = _key(model, candidates, here)
        choice = measure(model, candidates, here, announce)
        _write_cache(key, choice)
        return choice


def measure(model, candidates=CANDIDATES, here: dict | None = None, announce=None) -> WeightsChoice:
    """Run every candidate (copies made in the cache as `--weights KIND` would) and choose."""
    from .backends import cache_dir
    from .convert import cached_copy, copy_path
    from .errors import ConvertError
    from .models import sha256_file

    start = time.perf_counter()
    results = probe({"file": model.path})  # the reference; a file that cannot load has no copies either
    unloadable = not results["file"].get("failure", "crashed").startswith("crashed")
    if announce and not unloadable:  # (a file that does not load says so itself, in one line)
        announce(f"Measuring which weights run {model.name} fastest on this CPU (once per CPU and "
                 "llama.cpp build; `magpie-local doctor` shows the figures) ...")
    sha, own = None, model.gguf.get("general.file_type")
    paths, made = {"file": model.path}, []
    for kind in candidates:
        if kind == "file" or FILE_TYPES.get(kind) == own or unloadable:
            continue
        sha = sha or sha256_file(model.path)
        if not copy_path(model, sha, kind, cache_dir() / kind).is_file():
            made.append(kind)
        try:
            paths[kind] = cached_copy(model, sha, kind, cache_dir() / kind)
        except ConvertError as e:
            results[kind], paths[kind] = {"failure": f"could not be made: {e}"}, None
    results.update(probe({kind: path for kind, path in paths.items() if path and kind not in results}))
    reference = results.get("file")
    measured = []
    for kind, path in paths.items():
        r = results[kind]
        m = Measured(kind=kind, size=path.stat().st_size if path else 0, prompt_tok_s=r.get("prompt_tok_s"),
                     step_tok_s=r.get("step_tok_s"), failure=r.get("failure"))
        if kind != "file" and m.failure is None:
            if reference is None or reference.get("failure"):
                m.failure = "not checked: the file itself did not run"
            else:
                diffs = [abs(a - b) for a, b in zip(r["logprobs"], reference["logprobs"])]
                m.drift_mean, m.drift_max = sum(diffs) / len(diffs), max(diffs)
                if m.drift_mean > DRIFT_MEAN or m.drift_max > DRIFT_MAX:
                    m.failure = (f"drifts {m.drift_mean:.3f} / {m.drift_max:.2f} nats from the file "
                                 f"(budget {DRIFT_MEAN} / {DRIFT_MAX})")
        measured.append(m)
    choice = WeightsChoice(model=str(model.path), machine=here or machine(), measured=measured,
                           prompt=pick(measured, "prompt_tok_s"), step=pick(measured, "step_tok_s"),
                           seconds=time.perf_counter() - start)
    for kind in made:  # keep only the copies a choice runs on
        if kind not in (choice.prompt, choice.step) and paths[kind]:
            paths[kind].unlink(missing_ok=True)
    return choice


def pick(measured: list[Measured], speed: str) -> str:
    """Among the candidates that ran and stayed within the drift budget, those within MARGIN of the
    fastest are as fast as this machine can tell: of them, the one closest to the file (the file
    itself first)."""
    ok = [m for m in measured if m.failure is None and getattr(m, speed)]
    if not ok:
        return "file"
    fastest = max(getattr(m, speed) for m in ok)
    tied = [m for m in ok if getattr(m, speed) * MARGIN >= fastest]
    return min(tied, key=lambda m: m.drift_mean or 0.0).kind


def probe(paths: dict[str, Path], timeout: float = 300) -> dict[str, dict]:
    """{kind: figures} for each candidate, run one after another in a child process; a candidate
    whose run kills its process (SIGILL, SIGSEGV) is recorded as crashed and the rest go on in a
    new one."""
    todo, out = list(paths), {}
    while todo:
        args = [f"{kind}={paths[kind]}" for kind in todo]
        try:
            proc = subprocess.run([sys.executable, "-m", "magpie_local.tune", *args], capture_output=True,
                                  text=True, timeout=timeout)
            stdout, rc = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as e:  # its stdout is bytes, text=True or not
            stdout, rc = (e.stdout or b"").decode(errors="replace"), "timeout"
        for line in stdout.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("kind") in todo:
                out[record["kind"]] = record
        todo = [kind for kind in todo if kind not in out]
        if todo:  # the first one left is the one that took the process down
            if rc == "timeout":
                why = f"timed out after {timeout:.0f} s"
            elif isinstance(rc, int) and rc < 0:
                why = f"crashed ({signal.Signals(-rc).name})" if -rc in signal.valid_signals() else f"crashed ({rc})"
            else:
                why = f"its process exited with code {rc}"
            out[todo.pop(0)] = {"failure": why}
    return out


def step_tok_s(backend) -> float:
    """doctor's step rate on an open llama.cpp backend: the best of REPEATS 32-row steps on TEXT."""
    tokens = backend.tokenize(TEXT)
    return max(backend.step_rate(tokens, ROWS, STEPS) for _ in range(REPEATS))  # best of: the machine is shared


def _probe_here(kind: str, path: str) -> dict:
    """The figures of one candidate, in this (child) process."""
    from .backends.base import BackendError
    from .backends.llamacpp import LlamaCppBackend

    if os.environ.get(CRASH_SWITCH) == kind:
        os.kill(os.getpid(), signal.SIGSEGV)
    try:
        with LlamaCppBackend(path, ctx=64, parallel=ROWS) as be:
            tokens = be.tokenize(TEXT)
            seconds = float("inf")
            for _ in range(REPEATS):  # best of: this machine is shared
                start = time.perf_counter()
                logprobs = be.token_logprobs([(tokens, 1)])[0]
                seconds = min(seconds, time.perf_counter() - start)
            step = step_tok_s(be)
    except BackendError as e:
        return {"kind": kind, "failure": str(e)}
    return {"kind": kind, "prompt_tok_s": len(tokens) / seconds, "step_tok_s": step,
            "logprobs": [float(x) for x in logprobs]}


if __name__ == "__main__":  # the child of probe(): one JSON line per candidate, as each finishes
    for arg in sys.argv[1:]:
        kind, _, path = arg.partition("=")
        print(json.dumps(_probe_here(kind, path)), flush=True)
