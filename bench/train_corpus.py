#!/usr/bin/env python3
"""Writes a real English text corpus for `plexus bench train --data text:FILE` without the
network: the Python documentation's topic pages that every CPython install ships
(`pydoc_data.topics`, PSF licence, about 465,000 characters), topics in sorted order separated
by blank lines. Usage: bench/train_corpus.py OUT.txt
"""
import sys

from pydoc_data.topics import topics


def main(out):
    text = "\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n"
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"{out}: {len(text)} characters, {len(set(text))} distinct", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
