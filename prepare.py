"""
Prepare a character-level dataset: download Tiny Shakespeare (or read --input FILE),
map every distinct character to an integer, and write
    data/train.bin, data/val.bin   uint16 token ids, 90% / 10% split (as in nanoGPT)
    data/meta.json                 vocabulary, sizes, source and sha256 of the text
"""
import argparse
import hashlib
import json
import os
import signal
import sys

# Ctrl-C stops quietly from the start, while numpy loads too; os._exit at once, because an
# exception raised inside an import may be swallowed
if __name__ == '__main__':
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))

import numpy as np
import requests

URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
SHA256 = '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'
MIN_CHARS = 257  # one context window of the default models (256) plus one, in each split


def die(msg):
    print(f'error: {msg}', file=sys.stderr)
    sys.exit(2)


def download():
    try:
        r = requests.get(URL, timeout=30)
        r.raise_for_status()
    except requests.RequestException as e:
        die(f'could not download Tiny Shakespeare ({type(e).__name__}); '
            f'use a local copy instead: python prepare.py --input FILE')
    if hashlib.sha256(r.content).hexdigest() != SHA256:
        die(f'the downloaded file is incomplete or altered ({len(r.content):,} bytes, expected '
            '1,115,394); try again or use a local copy: python prepare.py --input FILE')
    return r.content.decode('utf-8')


def read_text(path):
    if os.path.isdir(path):
        die(f'{path} is a directory; give a text file: python prepare.py --input FILE')
    try:
        with open(path, 'rb') as f:
            raw = f.read()
    except OSError as e:
        die(f'cannot read {path} ({e.strerror}); check the path')
    try:
        return raw.decode('utf-8')
    except UnicodeDecodeError as e:
        die(f'{path} is not UTF-8 text (bad byte at offset {e.start}); '
            'convert it, e.g. iconv -t UTF-8')


def write_atomic(path, data):
    # write next to the target, then rename: a crash never leaves a half-written file
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--input', help='a UTF-8 text file, instead of downloading Tiny Shakespeare')
    p.add_argument('--out-dir', default='data', help='where to write train.bin, val.bin, meta.json')
    args = p.parse_args()

    text = read_text(args.input) if args.input else download()
    source = os.path.abspath(args.input) if args.input else URL
    if not text:
        die(f'{args.input} is empty; give a file with some text in it')
    vocab = ''.join(sorted(set(text)))
    if len(vocab) > 65536:
        die(f'the text has {len(vocab):,} distinct characters, more than uint16 token ids can '
            'hold (65,536)')
    n_train = int(0.9 * len(text))
    if len(text) - n_train < MIN_CHARS:
        die(f'the text has {len(text):,} characters; it needs at least {10 * MIN_CHARS:,} '
            f'so that the 10% validation split holds one context window')

    stoi = {ch: i for i, ch in enumerate(vocab)}
    ids = np.array([stoi[ch] for ch in text], dtype=np.uint16)
    meta = dict(vocab=vocab, vocab_size=len(vocab), n_chars=len(text), n_train=n_train,
                n_val=len(text) - n_train, source=source,
                sha256=hashlib.sha256(text.encode('utf-8')).hexdigest())
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        die(f'--out-dir {args.out_dir} is a file; give a folder name')
    os.makedirs(args.out_dir, exist_ok=True)
    # the three files are written together, never one alone: Ctrl-C waits for these few ms
    ctrl_c = signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = lambda name: os.path.join(args.out_dir, name)  # noqa: E731
    write_atomic(out('train.bin'), ids[:n_train].tobytes())
    write_atomic(out('val.bin'), ids[n_train:].tobytes())
    write_atomic(out('meta.json'), json.dumps(meta, indent=1).encode('utf-8'))
    signal.signal(signal.SIGINT, ctrl_c)
    print(f'{len(text):,} characters from {source}')
    print(f'vocabulary: {len(vocab)} characters: {vocab!r}')
    print(f'train: {n_train:,} tokens, val: {len(text) - n_train:,} tokens -> {args.out_dir}/')


if __name__ == '__main__':
    main()
