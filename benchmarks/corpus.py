"""Run `caffe2torch inspect` over a folder of third-party prototxts and count what builds, per model family.

    python benchmarks/corpus.py CORPUS_DIR [--manifest CORPUS_DIR/manifest.tsv] [--timeout 300]

CORPUS_DIR holds the .prototxt files (kept out of this repository); the optional manifest is a TSV
with a header and the columns index, repo, commit, path, family, model, where a file's name starts
with its index. Prints one line per file (OK with the outputs and their shapes, or the one-line
error) and then the counts; exits 0 whatever the counts.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path


def inspect_file(path: Path, timeout: int) -> tuple[bool, str]:
    try:
        result = subprocess.run([sys.executable, "-m", "caffe2torch", "inspect", str(path), "--json"],
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout} s"
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        return False, lines[-1] if lines else f"exit status {result.returncode}"
    info = json.loads(result.stdout)
    shapes = {layer_top: shape for layer in info["layers"] for layer_top, shape in zip(layer["tops"],
                                                                                        layer["top_shapes"])}
    outputs = ", ".join(f"{name} {'x'.join(map(str, shapes.get(name, [])))}" for name in info["outputs"])
    return True, f"{len(info['layers'])} layers; {outputs}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--manifest", type=Path)
    parser.add_argument("--timeout", type=int, default=300)
    args = parser.parse_args()
    manifest = args.manifest or args.corpus / "manifest.tsv"
    families: dict[str, str] = {}
    if manifest.is_file():
        with manifest.open() as handle:
            for row in csv.DictReader(handle, delimiter="\t"):
                families[row["index"]] = row["family"]
    files = sorted(args.corpus.rglob("*.prototxt"))
    built, total = Counter(), Counter()
    for path in files:
        ok, text = inspect_file(path, args.timeout)
        family = families.get(path.name.split("_")[0], "unlabelled")
        total[family] += 1
        built[family] += ok
        print(f"{'OK' if ok else 'FAIL'}\t{path.name}\t{text}", flush=True)
    print(f"\n{sum(built.values())} of {len(files)} build: " +
          ", ".join(f"{family} {built[family]}/{total[family]}" for family in sorted(total)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
