"""README's Python snippet runs as written, on a tiny layout where it expects the 397B one."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def test_readme_python_snippet_runs(layout, tmp_path, monkeypatch, capsys):
    (snippet,) = python_blocks()
    (path,) = re.findall(r'load\("([^"]+)"', snippet)
    _, out = layout("qwen3_5_moe")
    home = tmp_path / "home"
    target = home / Path(path).relative_to("~")
    target.parent.mkdir(parents=True)
    target.symlink_to(out)
    monkeypatch.setenv("HOME", str(home))
    namespace: dict = {}
    exec(compile(snippet, str(README), "exec"), namespace)
    namespace["model"].flashmoe.close()
    printed = capsys.readouterr().out
    assert printed.strip(), "the snippet printed no text"
