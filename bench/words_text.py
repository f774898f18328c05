"""The text the fine-tuning benchmarks and `crates/plexus/tests/train_net.rs` (`sentences(1)`)
train on: 20,000 characters of random words from a 16-word list, from a fixed LCG.

Usage: python3 bench/words_text.py OUT_FILE
"""
import sys

words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "we",
         "pack", "my", "box", "with", "jugs"]
x, out, mask = 1, [], (1 << 64) - 1
n = 0
while n < 20_000:
    x = (x * 6364136223846793005 + 1442695040888963407) & mask
    w = words[(x >> 33) % len(words)] + (". " if (x >> 20) % 7 == 0 else " ")
    out.append(w)
    n += len(w)
open(sys.argv[1], "w").write("".join(out))
