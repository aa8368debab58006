"""One exit-code table for every console script (flashmoe.cli), and the ``flashmoe`` umbrella command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from flashmoe.bench import cli as bench_cli
from flashmoe.convert import cli as convert_cli
from flashmoe.convert.writers import SLOW_ENV
from flashmoe.runtime import chat, serve
from flashmoe.runtime import cli as run_cli

from flashmoe import __main__ as umbrella
from flashmoe.cli import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE

# A real process whose command raises what ``FAIL`` names: the wrapper as a console script sees it.
_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from flashmoe.cli import command

    @command("flashmoe-x", resumable=True)
    def main(argv=None):
        what = os.environ["FAIL"]
        if what == "bug":
            return {}["missing"]
        if what == "user":
            raise ValueError("--x 3 must be at most 2\\nsecond line")
        if what == "os":
            open("/nonexistent/dir/file")
        if what == "ctrl-c":
            raise KeyboardInterrupt
        return 0

    sys.exit(main())
    """
)


def _script(fail: str, debug: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, FAIL=fail)
    env.pop("FLASHMOE_DEBUG", None)
    if debug:
        env["FLASHMOE_DEBUG"] = "1"
    return subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    "fail, code, stderr",
    [
        ("none", 0, ""),
        ("user", EXIT_USAGE, "flashmoe-x: error: --x 3 must be at most 2\n"),
        ("os", EXIT_USAGE, "flashmoe-x: error: /nonexistent/dir/file: No such file or directory\n"),
        (
            "ctrl-c",
            EXIT_INTERRUPTED,
            "\nflashmoe-x: interrupted (rerun the same command to resume)\n",
        ),
        (
            "bug",
            EXIT_INTERNAL,
            "flashmoe-x: internal error: KeyError: 'missing' (a bug in flashmoe; "
            "FLASHMOE_DEBUG=1 shows the traceback)\n",
        ),
    ],
)
def test_exit_codes_and_one_line(fail, code, stderr):
    r = _script(fail)
    assert (r.returncode, r.stderr) == (code, stderr)


@pytest.mark.parametrize("fail", ["bug", "user"])
def test_flashmoe_debug_shows_the_traceback(fail):
    r = _script(fail, debug=True)
    assert r.stderr.startswith("Traceback (most recent call last):"), r.stderr
    assert r.returncode == (EXIT_INTERNAL if fail == "bug" else EXIT_USAGE)
    assert r.stderr.splitlines()[-1].startswith("flashmoe-x: ")


@pytest.mark.parametrize(
    "prog, main, argv",
    [
        ("flashmoe-run", run_cli.main, []),
        ("flashmoe-chat", chat.main, []),
        ("flashmoe-serve", serve.main, []),
        ("flashmoe-convert", convert_cli.main, ["-o", "{tmp}/out"]),
        ("flashmoe-bench", bench_cli.main, ["ppl", "--text", "x"]),
    ],
)
def test_every_command_reports_a_user_error_in_one_line(tmp_path, capsys, prog, main, argv):
    missing = tmp_path / "missing"
    if prog == "flashmoe-bench":
        argv = [argv[0], str(missing), *argv[1:]]
    else:
        argv = [str(missing), *(a.format(tmp=tmp_path) for a in argv)]
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: ") and str(missing) in err, err
    assert err.count("\n") == 1


def default_sigint() -> None:
    """In the child: SIGINT at its default and unblocked, whatever the test process inherited
    (Python installs its KeyboardInterrupt handler only when SIGINT is not ignored at start)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_convert_ctrl_c_exits_130_and_says_how_to_resume(layout, tmp_path):
    src, _ = layout("qwen3_moe")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "flashmoe.convert.cli", str(src), "-o", str(out), "--quiet"],
        env=dict(os.environ, **{SLOW_ENV: "0.1"}),
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    try:
        partial = out / "experts" / "layer-000.bin.partial"
        deadline = time.monotonic() + 60
        while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, err  # was 2 before the shared wrapper
    assert err.endswith("flashmoe-convert: interrupted (rerun the same command to resume)\n"), err


def test_umbrella_command_runs_each_script(tmp_path, capsys):
    assert set(umbrella.commands()) == {
        "convert",
        "run",
        "publish",
        "pull",
        "bench",
        "serve",
        "chat",
    }
    assert umbrella.main(["run", str(tmp_path / "missing")]) == EXIT_USAGE
    assert capsys.readouterr().err.startswith("flashmoe-run: error: ")
    assert umbrella.main(["nope"]) == EXIT_USAGE
    assert "unknown command 'nope'" in capsys.readouterr().err
    r = subprocess.run(
        [sys.executable, "-m", "flashmoe", "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and r.stdout.startswith("usage: flashmoe {")


def test_generation_defaults_agree_across_run_chat_and_serve():
    parsed = [m.build_parser().parse_args(["MODEL"]) for m in (run_cli, chat, serve)]
    defaults = {(a.max_tokens, a.temp, a.top_p, a.min_p) for a in parsed}
    assert defaults == {(512, 0.0, 1.0, 0.0)}
