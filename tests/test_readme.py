"""The ```bash blocks of README.md and docs/*.md, executed so that the walk-throughs cannot drift
from the code.

Every command of every block in every page is either run as written or listed in ``NOT_RUN`` with the reason
(a full `make demo`, a cloud cluster, a VAE that is not on this machine, ...); those are still
checked: each `raydiff` command's flags are parsed by raydiff's own parser and each `raydiff
train`/`tune` runs its `--dry-run`, so a renamed flag or key fails here.

How the blocks run: `raydiff ...` commands run in this process through the CLI's `main` (the
same entry point as the `raydiff` script; one interpreter start instead of one per command on a
slow 2-core machine), except `raydiff train` runs, which are real subprocesses with stdout and
stderr to a file (no terminal): that log is checked for clean progress output. `export` and
`NAME=value` lines set variables, `$NAME` expands as in bash. A command ending in `&` is started
in the background and waited for: `raydiff data serve-s3 --port 9000` gets a free port instead of
9000 (the only rewrite; other tests and engineers share this machine), and is stopped at the end.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_CHARS = 10_000  # a quick start; the reference lives in docs/


def doc_pages() -> list[Path]:
    """README.md and every docs/*.md page: the files whose bash blocks these tests run."""
    return [README, *sorted(DOCS.glob("*.md"))]


def doc_blocks() -> list[tuple[Path, list[str]]]:
    """(page, block) for every ```bash block of every page, in page order."""
    return [(page, block) for page in doc_pages() for block in bash_blocks(page.read_text())]


def s3_block() -> list[str]:
    """The S3 walk-through (docs/data.md), found by its first command wherever it lives."""
    found = [b for _, b in doc_blocks() if b and b[0].startswith(S3_BLOCK)]
    assert len(found) == 1, f"expected one S3 walk-through block in README.md or docs/*.md, found {len(found)}"
    return found[0]

# Command prefix -> why it is not executed here (checked by parsing / --dry-run instead; a
# reason starting with PARSE_ONLY: by parsing only, its dry run needing files the page makes).
PARSE_ONLY = "parse only: "
NOT_RUN = {
    "make demo": "installs into .venv and trains the full demo (about 8 min on 2 cores)",
    "make test": "runs this whole test suite",
    "raydiff train --config jobs/demo.yaml": "a full demo-sized training run (checked with --dry-run)",
    "raydiff sample --run runs/demo": "needs the demo run (the same flags run in the sampling block)",
    "raydiff sample --checkpoint runs/demo": "needs a finished demo run in runs/demo",
    "raydiff export --checkpoint runs/demo": "needs a finished demo run in runs/demo",
    "raydiff eval --checkpoint runs/demo": "FID/KID at 9 settings x 1000 samples (tests/test_fid.py runs it small)",
    "raydiff data encode": "needs a VAE directory (/models/sd-vae-ft-mse) or starts Ray; tests/test_latents.py and tests/test_data_captions.py encode with tiny ones",
    "raydiff train data.source=s3://my-bucket/shapes-latents": "needs the encoded latents (checked with --dry-run)",
    "raydiff train --config jobs/demo-text.yaml": "the full text demo (checked with --dry-run)",
    "raydiff data make-demo /tmp/shapes-text": "writes the captioned demo and its encoder (tests/test_data_captions.py runs it)",
    "raydiff data stats /tmp/shapes-text": "needs the captioned demo (tests/test_data_captions.py checks stats --captions)",
    "raydiff train data.source=/tmp/shapes-text-emb": PARSE_ONLY + "its data and text encoder come from the block's "
                                                      "make-demo and encode commands (tests/test_text_e2e.py trains so)",
    "raydiff tune --config jobs/tune-smoke.yaml": "4 trials, minutes (checked with --dry-run; tests/test_tune_e2e.py runs a sweep)",
    "raydiff tune --config jobs/tune-lr-weighting.yaml": "a GPU sweep (checked with --dry-run)",
    "RAY_AUTH_MODE=token ray job submit": "needs a Ray cluster (HEAD); the entrypoint is checked with --dry-run",
    "raydiff submit": "needs a Ray cluster (HEAD:8265); tests/test_jobs_submit.py submits to a local head",
    "raydiff controller": "needs a Ray cluster or starts one; tests/test_controller*.py run it",
    "raydiff bench sample --checkpoint runs/demo": "needs a finished demo run; tests/test_bench_sample.py runs the bench",
    "raydiff bench startup": "six fresh processes, three of them training runs (minutes); tests/test_bench_startup.py runs its plain side",
    "raydiff bench scale": "2-billion-sample sizes: about a minute on 2 cores; tests/test_bench_scale.py runs it at tiny sizes",
    "raydiff bench quality": "trains several models side by side (about a minute with --quick, far longer without); tests/test_quality.py runs it",
}
# The blocks that run end to end (slow tests), by their first command.
S3_BLOCK = "raydiff data serve-s3"
FINETUNE_BLOCK = "raydiff train run.name=ft-base"
RUN_BLOCKS = (S3_BLOCK, FINETUNE_BLOCK)


def bash_blocks(text: str) -> list[list[str]]:
    """Each ```bash block as a list of commands (continuation lines joined, comments kept)."""
    blocks = []
    for body in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        cmds, cur = [], ""
        for line in body.splitlines():
            cur += line.rstrip()
            if cur.endswith("\\"):
                cur = cur[:-1] + " "
                continue
            if cur.strip():
                cmds.append(cur.strip())
            cur = ""
        blocks.append(cmds)
    return blocks


def words(cmd: str, env: dict[str, str]) -> list[str]:
    """bash's word splitting of an unquoted command after $NAME expansion (what the README uses)."""
    expanded = re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: env.get(m.group(1) or m.group(2), ""), cmd)
    return shlex.split(expanded, comments=True)


def not_run_reason(cmd: str) -> str | None:
    return next((why for prefix, why in NOT_RUN.items() if cmd.startswith(prefix)), None)


def _raydiff_argv(cmd_words: list[str]) -> list[str] | None:
    """The raydiff arguments of a command (also inside `ray job submit ... -- raydiff ...`)."""
    if "raydiff" not in cmd_words:
        return None
    return cmd_words[cmd_words.index("raydiff") + 1 :]


def _with_dry_run(argv: list[str]) -> list[str] | None:
    if argv and argv[0] in ("train", "tune"):
        return argv if "--dry-run" in argv else [argv[0], "--dry-run", *argv[1:]]
    return None


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_doc_blocks_are_all_run_or_listed_with_a_reason_and_parse(page, tmp_path, monkeypatch, capsys):
    """Fast, per page (README.md, docs/*.md): every command is known; every raydiff command
    parses; train/tune commands dry-run."""
    from orchestrator.cli import build_parser, main

    monkeypatch.chdir(ROOT)  # job files are relative to the checkout
    monkeypatch.setenv("RAYDIFF_CACHE_DIR", str(tmp_path / "cache"))
    name = page.relative_to(ROOT).as_posix()
    env = {"S3": "http://127.0.0.1:9000", "TRY": ""}  # variables carry over between a page's blocks
    for block in bash_blocks(page.read_text()):
        runs = block and block[0].startswith(RUN_BLOCKS)
        for cmd in block:
            if re.match(r"^(export\s+)?\w+=", cmd) and not cmd.startswith(("RAY_AUTH_MODE",)):
                for assignment in shlex.split(cmd.removeprefix("export "), comments=True):
                    k, _, v = assignment.partition("=")
                    env[k] = " ".join(words(v, env))
                continue
            why = not_run_reason(cmd)
            cheap = "--dry-run" in cmd  # runs here, as written
            assert runs or why or cheap, f"{name} command neither run by tests/test_readme.py nor listed in NOT_RUN: {cmd}"
            argv = _raydiff_argv(words(cmd, env))
            if argv is None:
                assert cmd.startswith("make "), f"{name}: {cmd}"
                target = cmd.split()[1]
                p = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
                assert p.returncode == 0, p.stderr
                assert target != "demo" or "raydiff train" in p.stdout, p.stdout
                continue
            argv = [a for a in argv if a != "&"]
            try:
                build_parser().parse_args(argv)
            except SystemExit as e:
                pytest.fail(f"{name} command does not parse ({e}): {cmd}")
            dry = _with_dry_run(argv)
            if dry is not None and why and not why.startswith(PARSE_ONLY):
                assert main(dry) == 0, f"{name}: {' '.join(dry)}: {capsys.readouterr().err}"
            elif cheap and not runs and not (why or "").startswith(PARSE_ONLY):
                # Cheap commands outside the S3 walk-through (dry runs) run here, as written.
                assert main(argv) == 0, f"{name}: {cmd}: {capsys.readouterr().err}"


def test_doc_blocks_cover_the_walkthroughs_and_not_run_is_current():
    """The pages together still hold the walk-throughs, the S3 block once, and every NOT_RUN
    entry matches a command somewhere (a stale entry would excuse a command nobody wrote)."""
    blocks = doc_blocks()
    assert len(blocks) >= 8
    assert s3_block(), "the S3 walk-through block is gone"
    cmds = [cmd for _, block in blocks for cmd in block]
    unused = [p for p in NOT_RUN if not any(cmd.startswith(p) for cmd in cmds)]
    assert not unused, f"NOT_RUN entries that match no command in README.md or docs/*.md: {unused}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"background command exited with {proc.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


ANSI = re.compile(r"\x1b\[")
# Library lines the default output must not contain (orchestrator/logs.py filters them).
FILTERED = ("FutureWarning", "RayDeprecationWarning", "TrainingReport(", "PreemptionWatcher",
            "Starting execution of Dataset", "Execution plan of Dataset", "Attempting to start training worker group",
            "[c10d]", "Progress bars disabled", "repeated", "INFO streaming_executor", "built successfully",
            "Found credentials")


def check_clean_log(log: str) -> None:
    assert not ANSI.search(log), "ANSI escape codes in a log without a terminal"
    assert "\r" not in log, "bar redraws (carriage returns) in a log without a terminal"
    for needle in FILTERED:
        assert needle not in log, f"filtered library output in the log: {needle!r}\n{log}"
    assert "raydiff plan:" in log and "WARNING raydiff" not in log, log  # printed, not lost in (or prefixed by) logging
    assert log.count("raydiff: training s3-try: step 1/20") == 1, log  # once: not also through a logger
    assert re.search(r"raydiff: checkpoint at step 20/20, loss [0-9.]+: s3://my-bucket/runs/s3-try/checkpoint_00000020", log), log
    assert re.search(r"raydiff: step 20/20 \(100%\), loss [0-9.]+, \d+ img/s", log), log


IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _local(target: str) -> str | None:
    """The file part of a relative link (no URL, no pure #anchor), else None."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
        return None
    return target.split("#", 1)[0]


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_doc_images_exist_and_are_png(page):
    """The example images (the demo grid in README.md) are committed where the pages say."""
    links = IMAGE.findall(page.read_text())
    if page == README:
        assert "jobs/demo-samples.png" in links, "the README no longer shows the demo grid"
    for link in links:
        path = (page.parent / link).resolve()
        assert path.is_file(), f"{page.name}: image {link} is missing"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{page.name}: image {link} is not a PNG"


def test_readme_is_a_quick_start_linking_every_docs_page():
    """README.md stays short, links every docs/ page, and every page it links exists."""
    text = README.read_text()
    assert len(text) <= README_MAX_CHARS, f"README.md has {len(text)} characters (at most {README_MAX_CHARS}): move reference to docs/"
    linked = {(ROOT / f).resolve() for f in map(_local, LINK.findall(text)) if f}
    pages = sorted(DOCS.glob("*.md"))
    assert len(pages) >= 7, pages
    for page in pages:
        assert page.resolve() in linked, f"docs/{page.name} is not linked from README.md"
    for path in linked:
        assert path.exists(), f"README.md links {path.relative_to(ROOT)}, which does not exist"


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_doc_links_point_to_files_that_exist(page):
    """Relative links between README.md, docs/, cluster/README.md and BENCHMARKS.md resolve."""
    for target in LINK.findall(page.read_text()):
        f = _local(target)
        if f is None and not target.startswith("#"):
            continue  # a URL
        path = page.parent / f if f else page
        assert path.exists(), f"{page.name} links {target}, which does not exist"
        if "#" in target and path.suffix == ".md":
            anchor = target.split("#", 1)[1]
            assert anchor in _anchors(path), f"{page.name} links {target}: no such heading in {path.name}"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", page.read_text(), flags=re.M):
        out.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return out


@pytest.mark.slow
def test_s3_walkthrough_runs_as_written(tmp_path, monkeypatch, capsys):
    """The S3 block against its own local server: upload, list, verify, stats, a 20-step run with
    its log checked, the rerun of the complete run (summary, no Ray) and the dry run."""
    import ray

    from orchestrator.cli import main

    block = s3_block()
    port = _free_port()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAYDIFF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a throwaway loopback-only Ray
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    shapes = tmp_path / "shapes"  # /tmp/shapes is shared by everyone on this machine
    env: dict[str, str] = {}
    background: list[subprocess.Popen] = []
    train_runs = 0
    try:
        for cmd in block:
            cmd = cmd.replace("--port 9000", f"--port {port}").replace("127.0.0.1:9000", f"127.0.0.1:{port}")
            cmd = cmd.replace("/tmp/shapes", str(shapes))
            if re.match(r"^(export\s+)?\w+=", cmd):
                for assignment in shlex.split(cmd.removeprefix("export "), comments=True):
                    k, _, v = assignment.partition("=")
                    env[k] = " ".join(words(v, env))
                    if cmd.startswith("export "):
                        monkeypatch.setenv(k, env[k])
                continue
            argv = words(cmd, env)
            assert argv[0] == "raydiff", cmd
            if argv[-1] == "&":
                log = open(tmp_path / "serve.log", "w")
                background.append(subprocess.Popen([sys.executable, "-m", "orchestrator", *argv[1:-1]],
                                                   stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                                   env={**os.environ, "PYTHONPATH": str(ROOT)}))
                _wait_port(port, background[-1])
                continue
            if argv[1] == "train" and "--dry-run" not in argv and train_runs == 0:
                train_runs += 1
                log_file = tmp_path / "train.log"
                t0 = time.monotonic()
                with open(log_file, "w") as f:
                    p = subprocess.run([sys.executable, "-m", "orchestrator", *argv[1:]], stdout=f,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path,
                                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
                log = log_file.read_text()
                assert p.returncode == 0, log
                with capsys.disabled():
                    print(f"\n20-step S3 run (Ray start to exit): {time.monotonic() - t0:.0f} s")
                check_clean_log(log)
                continue
            t0 = time.monotonic()
            capsys.readouterr()
            ray_was_up = ray.is_initialized()  # the suite's session Ray may be up (tests/conftest.py)
            rc = main(argv[1:])
            out = capsys.readouterr()
            assert rc == 0, f"{cmd}\n{out.out}\n{out.err}"
            if argv[1] == "train" and "--dry-run" not in argv:
                # The complete run: its summary, without Ray, in seconds.
                assert ray.is_initialized() == ray_was_up  # neither started nor stopped
                assert "run s3://my-bucket/runs/s3-try is already complete at step 20" in out.out, out.out
                assert "checkpoint: s3://my-bucket/runs/s3-try/checkpoint_00000020" in out.out
                assert "sample grids: s3://my-bucket/runs/s3-try/samples/ (latest step_0000020.png)" in out.out
                took = time.monotonic() - t0
                with capsys.disabled():
                    print(f"rerun of the complete run: {took:.1f} s")
                assert took < 30, "the rerun of a complete run took too long"
            elif "--dry-run" in argv:
                assert ("would resume from s3://my-bucket/runs/s3-try/checkpoint_00000020 at step 20 and train to "
                        "step 40") in out.out, out.out
            elif argv[1:3] == ["data", "verify"]:
                assert "200 of 200 samples readable" in out.out
        assert train_runs == 1
    finally:
        for proc in background:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.slow
def test_fine_tuning_walkthrough_runs_as_written(ray_local, tmp_path, monkeypatch, capsys):
    """docs/fine-tuning.md: train and export a base model, fine-tune it with LoRA on another
    variant of the built-in set, sample, export the adapters and the merged model."""
    from orchestrator.cli import main

    found = [b for _, b in doc_blocks() if b and b[0].startswith(FINETUNE_BLOCK)]
    assert len(found) == 1
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAYDIFF_CACHE_DIR", str(tmp_path / "cache"))
    for cmd in found[0]:
        argv = words(cmd, {})
        assert argv[0] == "raydiff", cmd
        capsys.readouterr()
        rc = main(argv[1:])
        out = capsys.readouterr()
        assert rc == 0, f"{cmd}\n{out.out}\n{out.err}"
        if "--dry-run" in argv:
            assert "from pretrained: diffusion.prediction=v" in out.out and "LoRA adapters  : rank 4" in out.out
    assert (tmp_path / "ft-lora.png").stat().st_size > 0
    assert (tmp_path / "ft-adapters" / "unet" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ft-merged" / "unet" / "config.json").is_file()
