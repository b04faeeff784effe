"""Share of our code lines that occur verbatim in the original DiT / guided-diffusion sources.

Usage (the originals extracted with ``git archive``, see below):

    python /work/wt10ref/tools/verbatim.py --original /tmp/DiT --original /tmp/guided-diffusion --show FILE

With no FILE it measures dit_fast/, kernels/ and the top-level *.py of this repository. ``--show`` also
prints OUR matching lines (line number and our text; never the originals' text). ``--max-percent P``
exits 1 when any file is above P percent; otherwise the exit status is always 0. ``--min-length N``
(not part of the definition; default 0) also ignores normalised lines shorter than N characters, to see
how much of a file's share is ``)``/``else:``/``try:``.

An ``--original`` is either a directory (every *.py below it is read) or a bare git directory (the
*.py files of its HEAD are read with ``git show``). To extract the pinned originals:

    mkdir -p /tmp/DiT && git --git-dir=/work/.mirror/facebookresearch+DiT/repo archive ed81ce2 | tar -x -C /tmp/DiT
    mkdir -p /tmp/guided-diffusion && git --git-dir=/work/.mirror/openai+guided-diffusion/repo archive HEAD \
        | tar -x -C /tmp/guided-diffusion

How a line is compared (the definition of issue #10), on both sides alike:
  - code lines only: comments and docstrings (any statement that is a bare string) are removed;
  - whitespace is folded (runs collapsed to one space, ends stripped) and empty lines are dropped;
  - ``th.`` is read as ``torch.``;
  - import statements and argparse ``add_argument(...)`` calls are ignored (every line they span).
A line of ours is verbatim when the same normalised line occurs anywhere in the originals. Short lines
that any Python code has (``else:``, ``return x``, ``)``) count too: the measure is deliberately plain.
"""
import argparse
import ast
import io
import re
import subprocess
import sys
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_TH = re.compile(r"\bth\.")
_WS = re.compile(r"\s+")


def _ignored_lines(tree):
    """1-based line numbers spanned by docstrings/bare strings, imports and add_argument calls."""
    skip = set()
    for node in ast.walk(tree):
        span = False
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            span = True
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            span = True
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            span = True
        if span:
            skip.update(range(node.lineno, node.end_lineno + 1))
    return skip


def code_lines(source):
    """[(line number, normalised text)] of the code lines of one Python source."""
    lines = source.splitlines()
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    skip = _ignored_lines(tree)
    comment_col = {}  # line -> column where its comment starts
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comment_col[tok.start[0]] = tok.start[1]
    except (tokenize.TokenError, IndentationError):
        pass
    out = []
    for no, text in enumerate(lines, 1):
        if no in skip:
            continue
        if no in comment_col:
            text = text[: comment_col[no]]
        text = _TH.sub("torch.", _WS.sub(" ", text).strip())
        if text:
            out.append((no, text))
    return out


def _original_sources(path):
    """Yield the text of every *.py of one original: a directory or a bare git directory."""
    path = Path(path)
    if (path / "HEAD").is_file() and (path / "objects").is_dir():
        git = ["git", f"--git-dir={path}"]
        names = subprocess.run(git + ["ls-tree", "-r", "--name-only", "HEAD"], check=True,
                               capture_output=True, text=True).stdout.split()
        for name in names:
            if name.endswith(".py"):
                yield subprocess.run(git + ["show", f"HEAD:{name}"], check=True, capture_output=True,
                                     text=True).stdout
        return
    if not path.is_dir():
        sys.exit(f"--original {path}: not a directory or bare git directory")
    for file in sorted(path.rglob("*.py")):
        yield file.read_text(encoding="utf-8", errors="replace")


def original_line_set(paths):
    return {text for p in paths for src in _original_sources(p) for _, text in code_lines(src)}


def _our_files(targets):
    if not targets:
        targets = [REPO / "dit_fast", REPO / "kernels"] + sorted(REPO.glob("*.py"))
    for t in map(Path, targets):
        if t.is_dir():
            yield from sorted(f for f in t.rglob("*.py") if "__pycache__" not in f.parts)
        else:
            yield t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--original", action="append", required=True, help="original checkout or bare git dir")
    ap.add_argument("--show", action="store_true", help="print our verbatim lines")
    ap.add_argument("--max-percent", type=float, default=None, help="exit 1 if any file is above this")
    ap.add_argument("--min-length", type=int, default=0, help="ignore normalised lines shorter than this")
    ap.add_argument("files", nargs="*", help="files or directories (default: dit_fast/ kernels/ *.py)")
    args = ap.parse_args(argv)

    originals = original_line_set(args.original)
    rows, worst = [], 0.0
    for file in _our_files(args.files):
        lines = [(no, t) for no, t in code_lines(file.read_text(encoding="utf-8")) if len(t) >= args.min_length]
        hits = [(no, text) for no, text in lines if text in originals]
        pct = 100.0 * len(hits) / len(lines) if lines else 0.0
        worst = max(worst, pct)
        try:
            name = str(file.resolve().relative_to(REPO))
        except ValueError:
            name = str(file)
        rows.append((name, len(lines), len(hits), pct, hits))

    width = max([len(r[0]) for r in rows] + [4])
    print(f"{'file':<{width}}  {'code':>5}  {'verbatim':>8}  {'%':>6}")
    for name, n, k, pct, hits in rows:
        print(f"{name:<{width}}  {n:>5}  {k:>8}  {pct:>5.1f}%")
        if args.show:
            for no, text in hits:
                print(f"    {no:>5}: {text}")
    total_n, total_k = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"{'TOTAL':<{width}}  {total_n:>5}  {total_k:>8}  {100.0 * total_k / max(total_n, 1):>5.1f}%")
    if args.max_percent is not None and worst > args.max_percent:
        print(f"some file is above {args.max_percent}% verbatim", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
