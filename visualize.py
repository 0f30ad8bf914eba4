"""
Watch the models write: in the terminal, or as an animated SVG file for a web page.

    python visualize.py                     the diffusion model turning blanks into text
    python visualize.py --compare           the GPT (left to right) beside the diffusion model
    python visualize.py --prompt TEXT       either view, continuing a text
    python visualize.py --infill TEMPLATE   the diffusion model filling in a template's holes (_)
    python visualize.py --svg FILE          any view above, written to FILE as a looping animation
    python visualize.py --benchmark         sample quality against speed, both models
    python visualize.py --serve             the page visualize.html: both models live in a browser
    python visualize.py --benchmark-c       ./diffusion (diffusion.c) against python diffusion.py

Each sampler runs once while every step it takes is recorded with the real time it took; the
recording is then played back at that speed, plus --delay per frame so that fast machines can be
watched. With --compare both recordings play at once, so the columns race on the clock of their
sampling. When stdout is not a terminal, only the final texts and their timings are printed.

With --svg nothing is played: the frames go to one SVG file (SMIL animation, no script, so GitHub
shows it in a README), one frame per step of either sampler at --frame-ms each, the finished
text held a few seconds, then again from the start. Its clock counts steps, not measured time,
so the same weights and flags give the same file, byte for byte; docs/compare.svg is
`python visualize.py --compare --svg docs/compare.svg`.
"""
import argparse
import contextlib
import io
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from xml.sax.saxutils import escape

import plumbing  # first: from here on, Ctrl-C stops quietly, while torch loads too
import torch

import diffusion
import gpt
from plumbing import die, measure

ORDER, NOISE = diffusion.defaults['order'], diffusion.defaults['confidence_noise']
BLANK = '_'  # the mask token of the absorbing diffusion: a position not yet decided
SEPARATOR = ' │ '
# a changed character is reversed: readable on any theme
RESET, BOLD, DIM, CHANGED = '\x1b[0m', '\x1b[1m', '\x1b[2m', '\x1b[1;7m'
HIDE_CURSOR, SHOW_CURSOR = '\x1b[?25l', '\x1b[?25h'

@dataclass
class Recording:
    name: str
    vocab: str
    frames: list  # the token ids of the sample after each step of the sampler
    stamps: list  # seconds of sampling up to each frame
    sample: list  # the token ids of the finished sample
    passes: int  # forward passes of the model
    flops: float  # about 2 x parameters x characters fed to it (see measure)
    seconds: float  # wall time of the whole sampling run
    start: list = field(default_factory=list)  # the token ids before the first pass (prompt, masks)

    def text(self):
        return ''.join(self.vocab[t] for t in self.sample)

    def summary(self):
        return (f'{self.name} ({self.passes} forward passes, about {self.flops / 1e9:.3g} GFLOPs, '
                f'{self.seconds:.2f} s)')

def record(name, vocab, model, sample, seed, start=(), show=None):
    """Run sample(callback) once, keeping every frame it reports and when it reported it;
    show(frame, stamp), if given, sees each one as it comes (--serve sends it to the page)."""
    frames, stamps = [], []

    def callback(step, x):
        # .tolist() waits for the device, so the stamp is honest on a GPU too
        frames.append(x[0].tolist())
        stamps.append(time.perf_counter() - t0)
        if show:
            show(frames[-1], stamps[-1])
    # the same sample as `python diffusion.py --seed` (or gpt.py) with the same flags
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    x, passes, flops, seconds = measure(model, lambda: sample(callback))
    if not frames:  # a prompt as long as the text leaves the GPT nothing to do: one frame shows it
        frames, stamps = [x[0].tolist()], [seconds]
    return Recording(name, vocab, frames, stamps, x[0].tolist(), passes, flops, seconds,
                     list(start))

def load(module, path, args):
    model, ckpt = module.load_checkpoint(path)
    if args.length and args.length > model.config.block_size:
        die(f'--length {args.length} is longer than the context of {path} '
            f'({model.config.block_size} characters)')
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
    header = f'{rec.name}  step {k + 1}/{len(rec.frames)}  {rec.stamps[k]:.2f} s'
    header = header[:width].ljust(width)
    rows = [cells[i:i + width] for i in range(0, length, width)]
    return ([BOLD + header + RESET if color else header]
            + [''.join(row) + ' ' * (width - len(row)) for row in rows])

def play(recordings, delay, color):
    """Redraw the columns in place, each frame at the moment its sampler produced it (plus the
    delays)."""
    length = max(len(rec.sample) for rec in recordings)
    # a line that fills the last column would wrap in some terminals
    columns = shutil.get_terminal_size().columns - 1
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
# animated SVG (--svg): the same frames, written to one file that loops in a browser

# The clock of the picture is one frame per step of either sampler at a fixed pace, not the
# measured one, so that the same weights and flags always give the same bytes.
FRAME_MS = 40  # default of --frame-ms
LEAD_MS = 600  # the start, before the first pass, is held this long...
HOLD_MS = 3000  # ...and the finished texts this long, before the loop begins again
FLASH_MS = 120  # a character that has just changed is drawn reversed this long, as in the terminal
WRAP = 64  # a line of the finished text longer than this wraps before a word, as a reader would
FONT_PX, CELL_W, CELL_H = 13, 8, 17  # a cell a little wider than a monospace glyph (0.6 em)
MARGIN, GAP = 16, 3  # pixels around the picture; cells between the two columns
MONOSPACE = ("ui-monospace,SFMono-Regular,Menlo,Consolas,'DejaVu Sans Mono','Liberation Mono',"
             "monospace")
# GitHub's dark palette on a dark box of its own: readable on a light page and on a dark one
STYLE = ('.bg{fill:#0d1117;stroke:#30363d}.t{fill:#c9d1d9}.d{fill:#484f58}.h{fill:#8b949e}'
         '.name{fill:#e6edf3;font-weight:bold}.r{fill:#e3b341}.n{fill:#0d1117}'
         '.line{stroke:#30363d}')
NEWLINE = '↵'  # a line break, drawn where it stands: at the end of its line, or mid-line
MASK = '·'  # a position not yet decided: a dot keeps the words apart better than the terminal's _
IDS = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'

def layout(text, width):
    """(row, column) of each character of the finished text: its own line breaks, and a line longer
    than width wrapped before the word that would cross it. A line break ends the line it is on."""
    places, row, col = [], 0, 0
    for i, c in enumerate(text):
        if c == '\n':
            places.append((row, col))
            row, col = row + 1, 0
            continue
        if c == ' ':
            wrap = col > width  # one space may hang past the edge, where the line breaks anyway
        elif i == 0 or text[i - 1] in ' \n':  # the start of a word: it moves to the next line whole
            word = re.match(r'[^ \n]*', text[i:]).group()
            wrap = col > 0 and col + len(word) > width
        else:
            wrap = col >= width  # a word longer than a line is cut
        if wrap:
            row, col = row + 1, 0
        places.append((row, col))
        col += 1
    return places

class Glyphs:
    """The drawn characters, each defined once in <defs> and shown in the cells by reference."""

    def __init__(self):
        self.ids = {}  # (class, character) -> id, in order of first use: the same file every time

    def __call__(self, style, char=''):
        if (style, char) not in self.ids:
            n, name = len(self.ids), ''
            while True:  # a, ..., Z, ba, bb, ...: short names, as every change repeats one
                n, digit = divmod(n, len(IDS))
                name = IDS[digit] + name
                if not n:
                    break
            self.ids[style, char] = name
        return self.ids[style, char]

    def defs(self):
        lines = []
        for (style, char), name in self.ids.items():
            if style == 'empty':
                lines.append(f'<g id="{name}"/>')
            elif style == 'flash':  # reverse video: a block of the accent colour behind it
                lines.append(f'<g id="{name}"><rect class="r" x="{-CELL_W / 2:g}" y="{4 - CELL_H}" '
                             f'width="{CELL_W}" height="{CELL_H}"/>'
                             f'<text class="n">{escape(char)}</text></g>')
            else:
                lines.append(f'<text id="{name}" class="{style}">{escape(char)}</text>')
        return '\n'.join(lines)

def cell(x, y, timeline, period, frame_ms):
    """One cell: a <use> of the glyph it shows and, if that changes, one discrete SMIL animation
    over the loop listing every (moment in ms, glyph id). Its plain reference is the last glyph, so
    that a viewer that does not animate shows the finished text."""
    changes = [(t, glyph) for j, (t, glyph) in enumerate(timeline)
               if not j or glyph != timeline[j - 1][1]]
    place = f'x="{x:g}" y="{y:g}"'
    if len(changes) == 1:
        return f'<use xlink:href="#{changes[0][1]}" {place}/>'
    # every moment is a whole number of frames: this many decimals keep them apart and in order
    digits = len(str(period // frame_ms)) + 1
    times = ';'.join(f'{t / period:.{digits}f}'.rstrip('0').rstrip('.') for t, _ in changes)
    values = ';'.join(f'#{glyph}' for _, glyph in changes)
    return (f'<use xlink:href="#{changes[-1][1]}" {place}><animate attributeName="xlink:href" '
            f'values="{values}" keyTimes="{times}" dur="{period}ms" calcMode="discrete" '
            f'repeatCount="indefinite"/></use>')

def animation(recordings, args):
    """The whole animation as the text of one self-contained SVG file: no script, font or link."""
    frame_ms = args.frame_ms
    lead = -(-LEAD_MS // frame_ms) * frame_ms  # whole frames: every moment lies on the frame grid
    flash = max(1, round(FLASH_MS / frame_ms)) * frame_ms
    passes = max(len(rec.frames) for rec in recordings)
    period = lead + passes * frame_ms + -(-HOLD_MS // frame_ms) * frame_ms
    glyphs = Glyphs()

    def when(k):  # the moment frame k is shown; frame -1 is the start, before the first pass
        return lead + k * frame_ms if k >= 0 else 0

    def look(rec, token, changed):
        """The glyph of a token: a dim dot for the mask, a dim arrow for a line break, the
        character reversed when it has just changed, and nothing where the GPT has not got to."""
        if token is None:
            return glyphs('empty')
        if token == len(rec.vocab):
            return glyphs('d', MASK)
        char = NEWLINE if rec.vocab[token] == '\n' else visible(rec.vocab[token])
        return glyphs('flash' if changed else 'd' if char == NEWLINE else 't', char)

    columns, left = [], MARGIN
    for rec in recordings:
        places = layout(rec.text(), WRAP)
        holes = 'every hole' if args.infill is not None else 'all positions'
        title = (f' · {args.steps} steps, {holes} at once' if rec.name == 'diffusion' else
                 ' · left to right, one character per pass')
        counter = [f'step {k:>{len(str(len(rec.frames)))}}/{len(rec.frames)}'
                   for k in range(len(rec.frames) + 1)]
        # as wide as the longest line, and at least as the header
        width = max(max((col + 1 for _, col in places), default=1),
                    len(rec.name + title) + len(counter[0]) + 2)
        columns.append((rec, places, title, counter, width, left))
        left += (width + GAP) * CELL_W
    rows = max(row + 1 for column in columns for row, _ in column[1] or [(0, 0)])
    width_px = left - GAP * CELL_W + MARGIN
    baseline = MARGIN + FONT_PX  # of the header; the text starts a blank line below
    footer = baseline + (rows + 3) * CELL_H  # a blank line below the text
    height_px = footer + MARGIN
    body = [f'<rect class="bg" x="0.5" y="0.5" width="{width_px - 1}" height="{height_px - 1}" '
            'rx="6"/>']
    for n, (rec, places, title, counter, width, x0) in enumerate(columns):
        if n:  # a rule between the columns
            x = x0 - GAP * CELL_W / 2
            body.append(f'<line class="line" x1="{x:g}" y1="{MARGIN}" x2="{x:g}" '
                        f'y2="{height_px - MARGIN}"/>')
        body.append(f'<g id="{escape(rec.name)}">')
        body.append(f'<text class="h" x="{x0}" y="{baseline}" text-anchor="start">'
                    f'<tspan class="name">{escape(rec.name)}</tspan>{escape(title)}</text>')
        # the step counter, right-aligned: each of its characters is a cell changing with the frames
        for j in range(len(counter[0])):
            timeline = [(when(k - 1), glyphs('h', text[j]) if text[j] != ' ' else glyphs('empty'))
                        for k, text in enumerate(counter)]
            x = x0 + (width - len(counter[0]) + j + 0.5) * CELL_W
            body.append(cell(x, baseline, timeline, period, frame_ms))
        body.append('<g class="text">')  # one cell per character of the text, in its order
        frames = [rec.start] + rec.frames
        for i, (row, col) in enumerate(places):
            # the frames where this position changes: k = -1 is the start, before the first pass
            changes = []
            for k, frame in enumerate(frames, start=-1):
                token = frame[i] if i < len(frame) else None
                if not changes or token != changes[-1][1]:
                    changes.append((k, token))
            timeline = []
            for j, (k, token) in enumerate(changes):
                until = when(changes[j + 1][0]) if j + 1 < len(changes) else period
                if k >= 0 and token not in (None, len(rec.vocab)):  # new: reversed for a moment
                    timeline.append((when(k), look(rec, token, changed=True)))
                    if when(k) + flash < until:
                        timeline.append((when(k) + flash, look(rec, token, changed=False)))
                else:
                    timeline.append((when(k), look(rec, token, changed=False)))
            x, y = x0 + (col + 0.5) * CELL_W, baseline + (row + 2) * CELL_H
            body.append(cell(x, y, timeline, period, frame_ms))
        body.append('</g></g>')
    clock = 'for both models' if len(recordings) > 1 else 'of the model'
    body.append(f'<text class="h" x="{MARGIN}" y="{footer}" text-anchor="start">'
                f'one frame per step {clock}, {frame_ms} ms each</text>')
    names = ' beside '.join(rec.name for rec in recordings)
    return '\n'.join([
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
        f'width="{width_px:g}" height="{height_px:g}" viewBox="0 0 {width_px:g} {height_px:g}" '
        f'font-family="{MONOSPACE}" font-size="{FONT_PX}" text-anchor="middle" role="img">',
        f'<title>{escape(names)} writing, one frame per step ({frame_ms} ms each)</title>',
        f'<style>{STYLE}</style>',
        '<defs>', glyphs.defs(), '</defs>',
        *body,
        '</svg>', ''])

def write_svg(path, recordings, args):
    """Write the animation to path through a temp file beside it, so that an interrupted run never
    leaves half a file, and say so in one line."""
    data = animation(recordings, args).encode()
    plumbing.write_atomic(path, lambda f: f.write(data), f'--svg {path}',
                          'give a path in a folder you can write')
    frames = ' + '.join(f'{len(rec.frames)} {rec.name}' for rec in recordings)
    print(f'wrote {path} ({len(data) / 1000:.0f} KB, {frames} frames)')

# -----------------------------------------------------------------------------
# benchmark

@torch.no_grad()
def generative_bits(judge, x):
    """Bits/char of each sample under the GPT (generative perplexity, the SEDD paper's measure of
    quality)."""
    # the GPT's start token first, as in gpt.generate
    batch = torch.cat([torch.zeros_like(x[:, :1]), x], 1)
    logits = judge(batch[:, :-1])
    nats = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction='none')
    nats = nats.mean(1)
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

def distinct_4grams(texts):
    """Distinct character 4-grams / all 4-grams of the texts as printed, separator lines included:
    below real text's, repetitive; above it, more random than real text."""
    printed = ('\n' + '-' * 40 + '\n').join(texts)
    grams = [printed[i:i + 4] for i in range(len(printed) - 3)]
    return len(set(grams)) / max(1, len(grams))

def benchmark(args, num_samples=32):
    gpt_ckpt, diffusion_ckpt = checkpoints(args)
    judge, vocab = load(gpt, gpt_ckpt, args)
    model, diffusion_vocab = load(diffusion, diffusion_ckpt, args)
    if vocab != diffusion_vocab:
        die('the GPT and the diffusion model were trained on different vocabularies; '
            'give matching --gpt-ckpt and --diffusion-ckpt')
    known = training_words(gpt.defaults['data_dir'])
    # one context of the diffusion model after the start token, as `python diffusion.py` writes
    length = args.length or min(judge.config.block_size, model.config.block_size) - 1
    gpt_t = gpt.defaults['temperature']
    samplers = [(f'GPT, temperature {t}{" (default)" * (t == gpt_t)}, key/value cache', judge,
                 lambda n, t=t: gpt.generate(judge, n, length, t, args.device))
                for t in sorted({gpt_t, 1}, reverse=True)]

    def diffusion_row(steps, t, order='random', noise=0.0, note=''):
        name = f'diffusion, {steps} steps, temperature {t}, {order} order'
        name += f', confidence noise {noise}' if order == 'confidence' else ''
        return (name + note, model, lambda n: diffusion.generate(
            model, n, length, steps, t, args.device, order=order, confidence_noise=noise))
    # the exact model: random order, temperature 1
    t, order, noise = diffusion.defaults['temperature'], ORDER, NOISE
    samplers += [diffusion_row(s, 1, note=' (the exact model)') for s in args.benchmark_steps]
    steps = args.steps
    if model.config.graph == 'absorb':  # each order at the defaults, then confidence noise
        orders = [('random', 0.0)] * (t != 1) + [('left-to-right', 0.0)] + [
            ('confidence', tau) for tau in sorted({0.0, 1.0, 3.0, 10.0, noise})]
        samplers += [diffusion_row(steps, t, o, tau, ' (default)' * (o == order and (
            o != 'confidence' or tau == noise))) for o, tau in orders]
        samplers.append(diffusion_row(length, t, 'left-to-right', note=', one character a step'))

    def row(name, cost, x):
        bits = generative_bits(judge, x)
        texts = [''.join(vocab[t] for t in line) for line in x.tolist()]
        words = '-' if known is None else f'{real_words(texts, known):.0%}'
        print(f'| {name} | {cost} | {bits.mean():.3f} ± {bits.std() / math.sqrt(len(x)):.3f} | '
              f'{words} | {distinct_4grams(texts):.1%} |', flush=True)

    print(f'| sampler | forward passes | GFLOPs | seconds for 1 x {length} characters '
          f'| generative bits/char ({num_samples} samples) | real words | distinct 4-grams |')
    print('|---|---|---|---|---|---|---|')
    for name, net, sample in samplers:
        torch.manual_seed(args.seed)
        _, passes, flops, seconds = measure(net, lambda: sample(1))
        row(name, f'{passes} | {flops / 1e9:.3g} | {seconds:.2f}', sample(num_samples))
    # real text, scored the same way: about what a flawless model's samples would get
    if known is not None:
        val = torch.from_numpy(gpt.load_data(gpt.defaults['data_dir'])[1]['val'].astype('int64'))
        # after a start token, as the samples are (a text without one: anywhere)
        starts = 1 + torch.nonzero(val[:-length] == 0).flatten()
        starts = starts if len(starts) else torch.arange(len(val) - length + 1)
        spread = starts[torch.linspace(0, len(starts) - 1, num_samples).long()]
        row('held-out text (data/val.bin), for reference', '- | - | -',
            torch.stack([val[i:i + length] for i in spread]).to(args.device))

# -----------------------------------------------------------------------------
# the page (--serve): visualize.html in a browser, sent each frame as the samplers make it

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'visualize.html')
MAX_BODY = 16384  # bytes of a request: its text is at most one context, and a few settings
MAX_STEPS = 4096  # a generation holds the server (closing its tab stops it): 4,097 frames at most
BUSY_WAIT = 3  # seconds a request waits for the one before it to end, before it is told busy
LOCAL = ('127.0.0.1', 'localhost')  # --host values that leave the page to this machine alone
CHECKING = threading.Lock()  # a request's checks capture sys.stderr, which the threads share

class BadRequest(Exception):
    """Input the page can fix: a 400 whose one line the page shows; the server goes on serving."""

def page_options(args, models):
    """What the page offers, with the defaults of `python diffusion.py` as its parser has them (and
    of `python gpt.py`: an empty temperature is each script's own), and for the absorbing graph
    the decoding order and its noise."""
    defaults = vars(diffusion.parse_args([f'--device={args.device}']))
    model = models['diffusion'][0]
    extra = {} if model.config.graph == 'uniform' else dict(
        order=dict(default=ORDER, choices=plumbing.ORDERS),
        confidence_noise=dict(default=NOISE, choices=None))
    temperatures = {'GPT': gpt.defaults['temperature'], 'diffusion': defaults['temperature']}
    return dict({k: defaults[k] for k in ('steps', 'seed', 'hole')}, extra=extra,
                temperatures=temperatures, length=model.config.block_size - 1,
                max_steps=MAX_STEPS, graph=model.config.graph,
                context=min(m.config.block_size for m, _ in models.values()),
                checkpoints=dict(zip(('GPT', 'diffusion'), checkpoints(args)), device=args.device))

def request(settings, args, models, options):
    """The samplers and seed of a request's settings (JSON): diffusion.py's own parser and checks
    (plumbing's) read them, and their error line becomes the 400's message."""
    if not isinstance(settings, dict) or not isinstance(settings.get('text', ''), str):
        raise BadRequest('send a JSON object of the settings, its text a string')
    text, hole = settings.pop('text', ''), options['hole']
    unknown = settings.keys() - {'steps', 'temperature', 'seed', 'length', *options['extra']}
    if unknown:
        raise BadRequest(f'unknown setting {sorted(unknown)[0]!r}')
    # '--flag=value', so that a text or value starting with '-' is read as one
    argv = [f'--device={args.device}'] + [f'--{name.replace("_", "-")}={value}'
                                          for name, value in settings.items()
                                          if not (name == 'length' and hole in text)]
    argv += [f'--infill={text}'] if hole in text else [f'--prompt={text}'] if text else []
    with CHECKING, contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            job = diffusion.parse_args(argv)
            if 'temperature' not in settings:  # each model at its own script's default
                job.temperature = None
            if job.length and job.length > options['context']:
                raise BadRequest(f'--length {job.length} is longer than the context of the models '
                                 f'({options["context"]} characters)')
            if job.steps > MAX_STEPS:
                raise BadRequest(f'--steps {job.steps}: give at most {MAX_STEPS} here')
            # the GPT cannot fill in holes: a template is the diffusion model's alone
            used = models if job.infill is None else {'diffusion': models['diffusion']}
            return samplers(job, used), job.seed
        except SystemExit:  # die() or argparse: 'error: ...' is the last line
            raise BadRequest(err.getvalue().strip().splitlines()[-1].partition('error: ')[2])

class Page(BaseHTTPRequestHandler):
    """GET / is the page, GET /options its settings; POST /generate streams the frames of one
    sample of each model as Server-Sent Events, a line of JSON each."""
    busy = threading.Lock()  # one generation at a time: the models and the cores are shared

    def log_message(self, *_):  # a line per request would bury the address printed at the start
        pass

    def reply(self, code, body, kind='text/plain; charset=utf-8'):
        body = body if isinstance(body, bytes) else f'{body}\n'.encode()
        self.send_response(code)
        self.send_header('Content-Type', kind)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.partition('?')[0]
        if path == '/':
            self.reply(200, self.server.page, 'text/html; charset=utf-8')
        elif path == '/options':
            self.reply(200, json.dumps(self.server.options).encode(), 'application/json')
        else:
            self.reply(404, f'no {path} here; the page is at /')

    def settings(self):
        """The request's body as JSON: none, too large a one or one not JSON is a BadRequest."""
        size = self.headers.get('Content-Length', '')
        if not re.fullmatch(r'[0-9]{1,12}', size):
            raise BadRequest('send the settings as a JSON body, with its Content-Length')
        if int(size) > MAX_BODY:  # left unread
            raise BadRequest(f'the body has {size} bytes, more than {MAX_BODY}; send less text')
        try:
            return json.loads(self.rfile.read(int(size)))
        except ValueError:
            raise BadRequest('the body is not JSON; send the settings as a JSON object') from None

    def do_POST(self):
        if self.path != '/generate':
            return self.reply(404, f'no {self.path} here; POST to /generate')
        try:
            jobs, seed = request(self.settings(), self.server.args, self.server.models,
                                 self.server.options)
        except BadRequest as e:
            return self.reply(400, e)
        # a while, for a generation just stopped to notice at its next frame that its tab is gone
        if not self.busy.acquire(timeout=BUSY_WAIT):
            return self.reply(503, 'busy: another generation is running; try again when it ends')
        try:
            self.stream(jobs, seed)
        finally:
            self.busy.release()

    def stream(self, jobs, seed):
        self.send_response(200)
        self.send_header('Content-Type', 'text/event-stream')
        self.send_header('Cache-Control', 'no-store')
        self.end_headers()

        def send(**event):  # unbuffered: each frame leaves as soon as it is made
            self.wfile.write(f'data: {json.dumps(event)}\n\n'.encode())
        try:
            # the diffusion model first, the GPT after it; the page races them on their clocks
            for name, vocab, model, sample, start in reversed(jobs):
                send(model=name, vocab=vocab, start=start)
                rec = record(name, vocab, model, sample, seed, start,
                             show=lambda frame, t: send(model=name, frame=frame, t=round(t, 4)))
                send(model=name, text=rec.text(), passes=rec.passes, gflops=rec.flops / 1e9,
                     seconds=rec.seconds)
            send(end=True)
        except ConnectionError:  # a broken pipe or a reset from send: the tab is gone, so stop
            pass

def serve(args):
    """Serve the page until Ctrl-C, which ends the process at once (plumbing's handler)."""
    gpt_ckpt, diffusion_ckpt = checkpoints(args)
    models = {'GPT': load(gpt, gpt_ckpt, args), 'diffusion': load(diffusion, diffusion_ckpt, args)}
    try:
        server = ThreadingHTTPServer((args.host, args.port), Page)
    except OSError as e:
        die(f'cannot serve at --host {args.host} --port {args.port} ({e.strerror or e}); '
            'give another --port, or a --host of this machine')
    with open(PAGE, 'rb') as f:
        server.page = f.read()
    server.args, server.models, server.options = args, models, page_options(args, models)
    print(f'serving the page at http://{args.host}:{server.server_address[1]}/ '
          '(Ctrl-C stops)', flush=True)
    if args.host not in LOCAL:
        print(f'warning: --host {args.host} opens the page to that network: whoever reaches this '
              'machine there can run the models', flush=True)
    server.serve_forever()

# -----------------------------------------------------------------------------
# diffusion.c against diffusion.py

TIMING = re.compile(r'in ([0-9.]+) s, ([0-9]+) forward passes, about ([0-9.e+]+) GFLOPs')

def c_compiler():
    """The C compiler here: $CC, else cc, gcc or clang; None if there is none."""
    names = [os.environ.get('CC'), 'cc', 'gcc', 'clang']
    return next((shutil.which(n) for n in names if n and shutil.which(n)), None)

def build_c(folder, flags=('-O3', '-march=native', '-fopenmp')):
    """diffusion.c compiled into folder with as many of flags as this compiler takes (the README's
    `cc -O3` at least): (the program, its build line)."""
    cc = c_compiler()
    if cc is None:
        die('--benchmark-c needs a C compiler (cc, gcc or clang) and none was found')
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'diffusion.c')
    program = os.path.join(folder, 'diffusion')
    for extra in (flags, flags[:2], flags[:1]):
        cmd = [cc, *extra, '-o', program, source, '-lm']
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode == 0:
            return program, ' '.join([os.path.basename(cc), *extra, '-o diffusion diffusion.c -lm'])
    die(f'diffusion.c does not compile here: {(res.stderr.strip() or "?").splitlines()[0]}')

def cpu_name():
    """The CPU's model, where Linux names it (/proc/cpuinfo), else what the platform says."""
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f
                        if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()

def benchmark_c(args, runs=5):
    """./diffusion and python diffusion.py on this CPU, one sample at --steps, the same weights
    and seed, both in float32: medians of `runs` runs each (taken in turns, so that other work on
    the machine weighs on both alike) of the seconds of the whole process, and of the sampling
    alone with the GFLOP/s it reached, as each program's timing line gives them."""
    path = checkpoints(args)[1]
    model, ckpt = diffusion.load_checkpoint(path)
    length = args.length or model.config.block_size - 1
    common = ['--length', length, '--steps', args.steps, '--seed', args.seed,
              '--temperature', args.temperature or diffusion.defaults['temperature'],
              '--order', args.order or ORDER, '--confidence-noise', args.confidence_noise]
    with tempfile.TemporaryDirectory() as folder:
        weights = os.path.join(folder, 'diffusion.safetensors')  # the same weights as path
        with open(weights, 'wb') as f:
            f.write(plumbing.safetensors_bytes(ckpt, 'diffusion'))
        program, build = build_c(folder)
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'diffusion.py')
        commands = {f'`./diffusion` (`{build}`)': [program, weights, *common],
                    '`python diffusion.py --dtype float32`':
                        [sys.executable, script, '--ckpt', path, '--dtype', 'float32',
                         '--device', 'cpu', *common]}
        figures = {name: [] for name in commands}
        for _ in range(runs):
            for name, cmd in commands.items():
                t0 = time.perf_counter()
                res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
                whole = time.perf_counter() - t0
                timing = TIMING.search(res.stderr)
                if res.returncode or not timing:
                    die(f'{name} failed: {(res.stderr.strip() or "?").splitlines()[-1]}')
                seconds, passes, gflops = float(timing[1]), int(timing[2]), float(timing[3])
                rate = gflops / seconds if seconds else math.nan  # a run too short to time
                figures[name].append((whole, seconds, passes, rate))
    print(f'1 x {length} characters at {args.steps} steps, seed {args.seed}, float32, on '
          f'{cpu_name()} ({os.cpu_count()} cores); medians of {runs} runs each')
    print('| program | whole process, s | sampling, s | forward passes | GFLOP/s |')
    print('|---|---|---|---|---|')
    medians = {}
    for name, rows in figures.items():
        medians[name] = [statistics.median(column) for column in zip(*rows)]
        whole, seconds, passes, rate = medians[name]
        print(f'| {name} | {whole:.2f} | {seconds:.2f} | {passes:.0f} | {rate:.1f} |')
    c, torch_rate = (m[3] for m in medians.values())
    print(f'C reaches {c / torch_rate:.2f} of the GFLOP/s of PyTorch')

# -----------------------------------------------------------------------------
# command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--compare', action='store_true',
                   help='the GPT and the diffusion model side by side')
    p.add_argument('--benchmark', action='store_true',
                   help='print a table of sampling time and sample quality (needs both models)')
    p.add_argument('--benchmark-c', action='store_true',
                   help='time ./diffusion (diffusion.c, built here) against python diffusion.py')
    p.add_argument('--steps', type=int,
                   help='denoising steps of the diffusion model (default: 128); with --benchmark, '
                        'only this many instead of the whole range')
    p.add_argument('--temperature', type=float,
                   help='of both models (default: that of gpt.py and diffusion.py); 1 samples them '
                        'exactly, lower is sharper and less varied')
    p.add_argument('--order', help=f'diffusion: which masks a step reveals: '
                                   f'{", ".join(plumbing.ORDERS)} (default: {ORDER})')
    p.add_argument('--confidence-noise', type=float, default=NOISE,
                   help=f'with --order confidence (default: {NOISE})')
    p.add_argument('--length', type=int,
                   help='characters, at most the context of the models (default: one context)')
    p.add_argument('--prompt', help='text both models continue')
    p.add_argument('--infill', metavar='TEMPLATE',
                   help='diffusion alone: text whose --hole characters it fills in')
    p.add_argument('--hole', default='_',
                   help='the character that marks a hole in --infill (default: _)')
    p.add_argument('--seed', type=int, default=1337,
                   help='default: 1337; same seed and flags, same text as diffusion.py and gpt.py')
    p.add_argument('--device', default=plumbing.best_device(),
                   help=f'cpu, cuda, cuda:N or mps (default: {plumbing.best_device()})')
    p.add_argument('--delay', type=float, default=0.02,
                   help='seconds added after each frame, to watch it (default: 0.02)')
    p.add_argument('--no-color', action='store_true',
                   help='no ANSI colours (never any when stdout is not a terminal)')
    p.add_argument('--svg', metavar='FILE',
                   help='write the animation to FILE, a looping SVG, instead of playing it')
    p.add_argument('--frame-ms', type=int,
                   help=f'with --svg: milliseconds per frame, a step (default: {FRAME_MS})')
    p.add_argument('--gpt-ckpt',
                   help=f'default: {gpt.defaults["out"]} if it exists, else {gpt.SHIPPED}')
    p.add_argument('--diffusion-ckpt',
                   help=f'default: {diffusion.defaults["out"]} if it exists, '
                        f'else {diffusion.SHIPPED}')
    p.add_argument('--serve', action='store_true',
                   help='serve the page visualize.html: both models live in a browser, with a '
                        'text box and every setting; until Ctrl-C')
    p.add_argument('--port', type=int, default=8000,
                   help='with --serve (default: 8000; 0 picks a free one)')
    p.add_argument('--host', default='127.0.0.1',
                   help='with --serve: the address to listen at (default: 127.0.0.1, this machine '
                        'alone)')
    args = p.parse_args(argv)
    plumbing.check_device(args.device)
    # the page sets what to sample and how; the command line, which models and where
    served = ('serve', 'port', 'host', 'device', 'gpt_ckpt', 'diffusion_ckpt')
    if args.serve:
        given = [k for k, v in vars(args).items() if k not in served and v != p.get_default(k)]
        if given:
            die(f'--serve takes the settings of each sample from the page; leave out '
                f'--{given[0].replace("_", "-")}')
    elif (args.port, args.host) != (p.get_default('port'), p.get_default('host')):
        die('--port and --host say where --serve serves the page; give --serve too')
    if not 0 <= args.port < 2 ** 16:
        die(f'--port {args.port}: give 1 to 65535 (or 0 for any free one)')
    if args.steps is not None and args.steps < 1:
        die('--steps must be at least 1')
    # --benchmark: the exact model at every number of steps, or at --steps only
    args.benchmark_steps = [args.steps] if args.steps else [16, 32, 64, 128, 256, 1024]
    args.steps = args.steps or 128
    if args.temperature is not None and not 1e-3 <= args.temperature <= 1e3:
        die(f'--temperature {args.temperature}: give a number from 0.001 to 1000')
    if args.order not in (None, *plumbing.ORDERS):
        die(f'unknown --order {args.order!r}; use {", ".join(plumbing.ORDERS)}')
    if not 0 <= args.confidence_noise < math.inf:
        die(f'--confidence-noise {args.confidence_noise}: give a number in [0, inf)')
    if args.length is not None and args.length < 1:
        die('--length must be at least 1')
    if args.benchmark_c and (args.benchmark or args.compare or args.svg is not None
                             or args.infill is not None or args.prompt is not None):
        die('--benchmark-c times the sampling of 1 text; leave out --benchmark, --compare, --svg, '
            '--infill and --prompt')
    if args.infill is not None and (args.compare or args.benchmark):
        die('--infill shows the diffusion model alone; leave out --compare and --benchmark')
    sampling = [args.prompt, args.temperature, args.order]
    if args.benchmark and (sampling != [None] * 3 or args.confidence_noise != NOISE):
        die('--benchmark measures samples without a prompt, at its own temperatures, orders and '
            'noise; leave out --prompt, --temperature, --order and --confidence-noise')
    if not 0 <= args.delay < math.inf:
        die('--delay must be a number of seconds, 0 or more')
    if args.svg is not None and args.benchmark:
        die('--svg writes the animation of a sample, --benchmark prints a table; '
            'leave out one of them')
    if args.frame_ms is not None and args.svg is None:
        die('--frame-ms sets the pace of the --svg animation; give --svg FILE too')
    if args.frame_ms is not None and args.frame_ms < 1:
        die('--frame-ms must be at least 1')
    args.frame_ms = args.frame_ms or FRAME_MS
    if args.svg is not None:  # before sampling, which can take a while
        folder = os.path.dirname(args.svg) or '.'
        if os.path.isdir(args.svg or '.'):
            example = os.path.join(args.svg, 'compare.svg')
            die(f'--svg {args.svg} is a folder; give a file name, e.g. {example}')
        if not os.path.isdir(folder):
            die(f'--svg {args.svg}: there is no folder {folder}; create it first or give another '
                'path')
    return args

def checkpoints(args):
    """The paths of the GPT and the diffusion model: the flags', else those the scripts pick."""
    return (args.gpt_ckpt or gpt.default_checkpoint(gpt.defaults['out']),
            args.diffusion_ckpt or diffusion.default_checkpoint(diffusion.defaults['out']))

def samplers(args, models):
    """(name, vocabulary, model, sample(callback), the token ids before the first pass) of each of
    models ({'GPT': (model, vocab), 'diffusion': ...}, the GPT optional) for the text of args."""
    out = []
    if 'GPT' in models:
        gpt_model, gpt_vocab = models['GPT']
        gpt_length, prompt = plumbing.prompt(args, gpt_vocab, gpt_model.config.block_size)
        # each model at its own script's default temperature, unless one is given for both
        gpt_t = args.temperature or gpt.defaults['temperature']
        out.append(('GPT', gpt_vocab, gpt_model,
                    lambda cb: gpt.generate(gpt_model, 1, gpt_length, gpt_t, args.device, cb,
                                            prompt),
                    prompt))
    model, vocab = models['diffusion']
    length, given = plumbing.given(args, vocab, model.config.block_size)
    order = plumbing.sampling_order(args, model.config.graph, ORDER)
    diffusion_t = args.temperature or diffusion.defaults['temperature']
    out.append(('diffusion', vocab, model,
                lambda cb: diffusion.generate(model, 1, length, args.steps, diffusion_t,
                                              args.device, cb, given, order,
                                              args.confidence_noise),
                given.tolist()))
    return out

def run(args, animate):
    gpt_ckpt, diffusion_ckpt = checkpoints(args)
    models = {'GPT': load(gpt, gpt_ckpt, args)} if args.compare else {}
    models['diffusion'] = load(diffusion, diffusion_ckpt, args)
    recordings = []
    for name, *rest, start in samplers(args, models):
        if sys.stdout.isatty():
            print(f'sampling with the {name} model...\x1b[K', end='\r', flush=True)
        recordings.append(record(name, *rest, args.seed, start))
    if args.svg:
        if sys.stdout.isatty():
            print('\x1b[K', end='')
        return write_svg(args.svg, recordings, args)
    if not animate:
        return print('\n\n'.join(f'=== {rec.summary()} ===\n{rec.text()}'
                                 for rec in recordings))
    sys.stdout.write(HIDE_CURSOR)
    play(recordings, args.delay, color=not args.no_color)
    print('\n'.join(rec.summary() for rec in recordings))

def main():
    args = parse_args()
    if args.benchmark:
        return benchmark(args)
    if args.serve:  # Ctrl-C stays plumbing's: the process ends at once, mid-generation or not
        return serve(args)
    if args.benchmark_c:
        return benchmark_c(args)
    animate = sys.stdout.isatty() and not args.svg  # --svg draws into its file instead
    # Ctrl-C raises KeyboardInterrupt again, caught below
    signal.signal(signal.SIGINT, signal.default_int_handler)
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
