"""
Watch the models write, in the terminal.

    python visualize.py                    the diffusion model turning blanks into text, one frame per step
    python visualize.py --compare          the GPT (left to right) beside the diffusion model (everywhere at once)
    python visualize.py --prompt TEXT      either view, continuing a text
    python visualize.py --infill TEMPLATE  the diffusion model filling in the holes (_) of a template
    python visualize.py --benchmark        quality against speed: diffusion at 16 to 256 steps, and the GPT

Each sampler runs once while every step it takes is recorded with the real time it took; the
recording is then played back at that speed, plus --delay per frame so that fast machines can be
watched. With --compare both recordings play at once, so the columns race on the clock of their
sampling. When stdout is not a terminal, only the final texts and their timings are printed.
"""
import argparse
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass

if __name__ == '__main__':  # Ctrl-C stops quietly from the start, while torch loads too
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))  # at once: an exception raised inside an import may be swallowed

import torch

import diffusion
import gpt
from diffusion import die, measure

BLANK = '_'  # the mask token of the absorbing diffusion: a position not yet decided
SEPARATOR = ' │ '
RESET, BOLD, DIM, CHANGED = '\x1b[0m', '\x1b[1m', '\x1b[2m', '\x1b[1;7m'  # reversed: readable on any theme
HIDE_CURSOR, SHOW_CURSOR = '\x1b[?25l', '\x1b[?25h'

@dataclass
class Recording:
    name: str
    vocab: str
    frames: list  # the token ids of the sample after each forward pass
    stamps: list  # seconds of sampling up to each frame
    sample: list  # the token ids of the finished sample
    passes: int  # forward passes of the model
    flops: float  # about 2 x parameters x characters fed to it (see measure)
    seconds: float  # wall time of the whole sampling run

    def text(self):
        return ''.join(self.vocab[t] for t in self.sample)

    def summary(self):
        return f'{self.name} ({self.passes} forward passes, about {self.flops / 1e9:.3g} GFLOPs, {self.seconds:.2f} s)'

def record(name, vocab, model, sample, seed):
    """Run sample(callback) once, keeping every frame it reports and when it reported it."""
    frames, stamps = [], []

    def callback(step, x):
        frames.append(x[0].tolist())  # .tolist() waits for the device, so the stamp is honest on a GPU too
        stamps.append(time.perf_counter() - t0)
    torch.manual_seed(seed)  # the same sample as `python diffusion.py --seed` (or gpt.py) with the same flags
    t0 = time.perf_counter()
    x, passes, flops, seconds = measure(model, lambda: sample(callback))
    if not frames:  # a prompt as long as the text leaves the GPT nothing to do: show it as one frame
        frames, stamps = [x[0].tolist()], [seconds]
    return Recording(name, vocab, frames, stamps, x[0].tolist(), passes, flops, seconds)

def load(module, path, args):
    model, ckpt = module.load_checkpoint(path)
    if args.length and args.length > model.config.block_size:
        die(f'--length {args.length} is longer than the context of {path} ({model.config.block_size} characters)')
    model = model.to(args.device).eval()
    # the first forward passes on a device pay one-off set-up costs; keep them out of the timings
    module.generate(model, 1, 1, device=args.device)
    return model, ckpt['vocab']

# -----------------------------------------------------------------------------
# drawing

def visible(c):
    # one terminal cell per character, so that positions stay put from frame to frame
    return '↵' if c == '\n' else c if c.isprintable() else '?'

def render(rec, k, width, length, color):
    """The lines of one column: a header, then frame k on a grid `width` cells wide."""
    glyphs = [visible(c) for c in rec.vocab] + [BLANK]  # token id len(vocab) is the mask
    frame, before = rec.frames[k], rec.frames[k - 1] if k else []
    cells = []
    for i in range(length):
        if i >= len(frame):  # the GPT has not got this far yet
            cells.append(' ')
        elif color and frame[i] == len(rec.vocab):
            cells.append(DIM + BLANK + RESET)
        elif color and (i >= len(before) or before[i] != frame[i]):  # changed by the last step
            cells.append(CHANGED + glyphs[frame[i]] + RESET)
        else:
            cells.append(glyphs[frame[i]])
    header = f'{rec.name}  step {k + 1}/{len(rec.frames)}  {rec.stamps[k]:.2f} s'[:width].ljust(width)
    rows = [cells[i:i + width] for i in range(0, length, width)]
    return [BOLD + header + RESET if color else header] + [''.join(row) + ' ' * (width - len(row)) for row in rows]

def play(recordings, delay, color):
    """Redraw the columns in place, each frame at the moment its sampler produced it (plus the delays)."""
    length = max(len(rec.sample) for rec in recordings)
    columns = shutil.get_terminal_size().columns - 1  # a line that fills the last column would wrap in some terminals
    side_by_side = len(recordings) == 2 and columns >= 79
    width = (columns - len(SEPARATOR)) // 2 if side_by_side else columns
    events = sorted((stamp + (k + 1) * delay, i, k)  # (when to show it, column, frame)
                    for i, rec in enumerate(recordings) for k, stamp in enumerate(rec.stamps))
    shown, height = [0] * len(recordings), 0
    start = time.perf_counter()
    for j, (due, i, k) in enumerate(events):
        time.sleep(max(0.0, due - (time.perf_counter() - start)))
        shown[i] = k
        if j + 1 < len(events) and events[j + 1][0] <= time.perf_counter() - start:
            continue  # running late: skip to the newest frame rather than draw every one
        blocks = [render(rec, k, width, length, color) for rec, k in zip(recordings, shown)]
        if side_by_side:
            lines = [left + SEPARATOR + right for left, right in zip(*blocks)]
        else:
            lines = blocks[0] + [line for block in blocks[1:] for line in [''] + block]
        up = f'\x1b[{height}A\r' if height else ''  # back to the top of the previous frame
        sys.stdout.write(up + ''.join(line + '\x1b[K\n' for line in lines))
        sys.stdout.flush()
        height = len(lines)

# -----------------------------------------------------------------------------
# benchmark

@torch.no_grad()
def generative_bits(judge, x):
    """Bits/char of each sample under the GPT (generative perplexity, the SEDD paper's measure of quality)."""
    batch = torch.cat([torch.zeros_like(x[:, :1]), x], 1)  # the GPT's start token first, as in gpt.generate
    logits = judge(batch[:, :-1])
    nats = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction='none').mean(1)
    return nats / math.log(2)

def training_words(data_dir):
    """Every word of the training text (None without data/), to check samples against."""
    if not os.path.exists(os.path.join(data_dir, 'train.bin')):
        return None
    vocab, split = gpt.load_data(data_dir)
    return set(re.findall(r"[A-Za-z']+", ''.join(vocab[t] for t in split['train'].tolist())))

def real_words(texts, known):
    """The fraction of the words in texts that occur in the set known."""
    words = [w for text in texts for w in re.findall(r"[A-Za-z']+", text)]
    return sum(w in known for w in words) / max(1, len(words))

def benchmark(args, num_samples=32):
    judge, vocab = load(gpt, args.gpt_ckpt or gpt.default_checkpoint(gpt.defaults['out']), args)
    model, diffusion_vocab = load(diffusion, args.diffusion_ckpt or diffusion.default_checkpoint(diffusion.defaults['out']), args)
    if vocab != diffusion_vocab:
        die('the GPT and the diffusion model were trained on different vocabularies; give matching --gpt-ckpt and --diffusion-ckpt')
    known = training_words(gpt.defaults['data_dir'])
    length = args.length or min(judge.config.block_size, model.config.block_size)
    samplers = [(f'GPT, temperature {t}, key/value cache', judge, lambda n, t=t: gpt.generate(judge, n, length, t, args.device))
                for t in (1, 0.8)]
    _, start = diffusion.conditioning(args, vocab, length)  # as `python diffusion.py`: the GPT's start token, then masks
    skip = int(start[0] < len(vocab))  # that token is given, not sampled: it is not scored
    samplers += [(f'diffusion, {steps} steps, temperature {t}', model,
                  lambda n, steps=steps, t=t: diffusion.generate(model, n, length, steps, t, args.device, given=start)[:, skip:])
                 for steps, t in ((16, 1), (32, 1), (64, 1), (128, 1), (256, 1), (128, 0.8))]

    def row(name, cost, x):
        bits = generative_bits(judge, x)
        words = None if known is None else real_words([''.join(vocab[t] for t in line) for line in x.tolist()], known)
        print(f'| {name} | {cost} | {bits.mean():.3f} ± {bits.std() / math.sqrt(len(x)):.3f} | '
              f'{"-" if words is None else f"{words:.0%}"} |', flush=True)

    print(f'| sampler | forward passes | GFLOPs | seconds for 1 x {length} characters | generative bits/char ({num_samples} samples) | real words |')
    print('|---|---|---|---|---|---|')
    for name, net, sample in samplers:
        torch.manual_seed(args.seed)
        _, passes, flops, seconds = measure(net, lambda: sample(1))
        row(name, f'{passes} | {flops / 1e9:.3g} | {seconds:.2f}', sample(num_samples))
    if known is not None:  # real text, scored the same way: about what a flawless model's samples would get
        val = torch.from_numpy(gpt.load_data(gpt.defaults['data_dir'])[1]['val'].astype('int64'))
        starts = 1 + torch.nonzero(val[:-length] == 0).flatten()  # after a start token, as the samples are
        starts = starts if len(starts) else torch.arange(len(val) - length + 1)  # (a text without one: anywhere)
        spread = starts[torch.linspace(0, len(starts) - 1, num_samples).long()]
        row('held-out text (data/val.bin), for reference', '- | - | -', torch.stack([val[i:i + length] for i in spread]).to(args.device))

# -----------------------------------------------------------------------------
# command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--compare', action='store_true', help='the GPT and the diffusion model side by side')
    p.add_argument('--benchmark', action='store_true', help='print a table of sampling time and sample quality (needs both models)')
    p.add_argument('--steps', type=int, default=128, help='denoising steps of the diffusion model (default: 128)')
    p.add_argument('--temperature', type=float, default=1.0, help='of both models; 1 (default) samples them exactly, lower is sharper and less varied')
    p.add_argument('--length', type=int, help='characters, at most the context of the models (default: one context)')
    p.add_argument('--prompt', help='text both models continue')
    p.add_argument('--infill', metavar='TEMPLATE', help='diffusion alone: text whose --hole characters it fills in')
    p.add_argument('--hole', default='_', help='the character that marks a hole in --infill (default: _)')
    p.add_argument('--seed', type=int, default=1337, help='default: 1337; same seed and flags, same text as diffusion.py and gpt.py')
    p.add_argument('--device', default='cpu', help='cpu (default) or cuda')
    p.add_argument('--delay', type=float, default=0.02, help='seconds added after each frame, to watch it (default: 0.02)')
    p.add_argument('--no-color', action='store_true', help='no ANSI colours (never any when stdout is not a terminal)')
    p.add_argument('--gpt-ckpt', help=f'default: {gpt.defaults["out"]} if it exists, else {gpt.SHIPPED}')
    p.add_argument('--diffusion-ckpt', help=f'default: {diffusion.defaults["out"]} if it exists, else {diffusion.SHIPPED}')
    args = p.parse_args(argv)
    if not (args.device == 'cpu' or args.device.startswith('cuda')):
        die(f'unknown device {args.device!r}; use cpu or cuda')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        die('--device cuda was asked for but CUDA is not available here; use --device cpu')
    if args.steps < 1:
        die('--steps must be at least 1')
    if args.temperature <= 0:
        die('--temperature must be above 0')
    if args.length is not None and args.length < 1:
        die('--length must be at least 1')
    if args.infill is not None and (args.compare or args.benchmark):
        die('--infill shows the diffusion model alone; leave out --compare and --benchmark')
    if (args.prompt is not None or args.temperature != 1) and args.benchmark:
        die('--benchmark measures samples without a prompt, at its own temperatures; leave out --prompt and --temperature')
    if not 0 <= args.delay < math.inf:
        die('--delay must be a number of seconds, 0 or more')
    return args

def run(args, animate):
    samplers = []  # (name, vocabulary, model, sample(callback))
    if args.compare:
        gpt_model, gpt_vocab = load(gpt, args.gpt_ckpt or gpt.default_checkpoint(gpt.defaults['out']), args)
        gpt_length, prompt = gpt.conditioning(args, gpt_vocab, gpt_model.config.block_size)
        samplers.append(('GPT', gpt_vocab, gpt_model,
                         lambda cb: gpt.generate(gpt_model, 1, gpt_length, args.temperature, args.device, cb, prompt)))
    model, vocab = load(diffusion, args.diffusion_ckpt or diffusion.default_checkpoint(diffusion.defaults['out']), args)
    length, given = diffusion.conditioning(args, vocab, model.config.block_size)
    samplers.append(('diffusion', vocab, model, lambda cb: diffusion.generate(model, 1, length, args.steps, args.temperature, args.device, cb, given)))
    recordings = []
    for name, *rest in samplers:
        if animate:
            print(f'sampling with the {name} model...\x1b[K', end='\r', flush=True)
        recordings.append(record(name, *rest, args.seed))
    if not animate:
        return print('\n\n'.join(f'=== {rec.summary()} ===\n{rec.text()}' for rec in recordings))
    sys.stdout.write(HIDE_CURSOR)
    play(recordings, args.delay, color=not args.no_color)
    print('\n'.join(rec.summary() for rec in recordings))

def main():
    args = parse_args()
    if args.benchmark:
        return benchmark(args)
    animate = sys.stdout.isatty()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises KeyboardInterrupt again, caught below
    try:
        run(args, animate)
    except KeyboardInterrupt:  # Ctrl-C ends the show early, without a traceback
        if animate:
            print()
    finally:
        if animate:
            sys.stdout.write(RESET + SHOW_CURSOR)
            sys.stdout.flush()

if __name__ == '__main__':
    main()
