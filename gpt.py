"""
A character-level GPT: the autoregressive baseline that diffusion.py is compared with.

    python gpt.py --train     train on data/ (see prepare.py) and save out/gpt.pt
    python gpt.py             sample from out/gpt.pt, or the shipped weights/gpt.pt
    python gpt.py --eval      validation loss in bits per character

`diff gpt.py diffusion.py` shows everything that turns this model into a diffusion model, and the key/value
cache that only the GPT has (marked `GPT only`).
"""
import argparse
import json
import math
import os
import platform
import signal
import sys
import time
from dataclasses import asdict, dataclass

if __name__ == '__main__':  # Ctrl-C stops quietly from the start, while torch loads too; training replaces this to save first
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))  # at once: an exception raised inside an import may be swallowed

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

KIND = 'gpt'
# hyperparameters; every one can be overridden on the command line, e.g. --max-iters 500
defaults = dict(
    n_layer=4, n_head=4, n_embd=256, block_size=256, dropout=0.1,  # model
    batch_size=32, max_iters=2500, lr=1e-3, min_lr=1e-4, warmup_iters=100,  # optimisation
    weight_decay=0.1, grad_clip=1.0, grad_accum=1,  # grad_accum: batches per step and process
    eval_interval=250, eval_iters=20, seed=1337,  # bookkeeping
    data_dir='data', out='out/gpt.pt', device='cuda' if torch.cuda.is_available() else 'cpu',
)
SHIPPED = 'weights/gpt.pt'

def die(msg):
    print(f'error: {msg}', file=sys.stderr)
    sys.exit(2)

# -----------------------------------------------------------------------------
# data

def load_data(data_dir):
    if not os.path.exists(os.path.join(data_dir, 'meta.json')):
        die(f'no prepared data in {data_dir}/; run: python prepare.py (or python prepare.py --input FILE)')
    with open(os.path.join(data_dir, 'meta.json')) as f:
        meta = json.load(f)
    split = {s: np.fromfile(os.path.join(data_dir, f'{s}.bin'), dtype=np.uint16) for s in ('train', 'val')}
    return meta['vocab'], split

EXTRA = 1  # a window holds one character more than the context: the target of its last position

def get_batch(data, batch_size, block_size, generator):
    ix = torch.randint(len(data) - block_size - EXTRA + 1, (batch_size,), generator=generator)
    return torch.stack([torch.from_numpy(data[i:i + block_size + EXTRA].astype(np.int64)) for i in ix.tolist()])

def val_windows(data, block_size):
    # non-overlapping windows covering the validation text, so --eval is deterministic
    n = (len(data) - EXTRA) // block_size
    return torch.from_numpy(data[:n * block_size + EXTRA].astype(np.int64)).unfold(0, block_size + EXTRA, block_size)

# -----------------------------------------------------------------------------
# model

@dataclass
class Config:
    vocab_size: int = 65
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    block_size: int = 256
    dropout: float = 0.0

CAUSAL = True  # each position attends only to itself and the positions before it

def rotary(q, k, start=0):
    # rotary position embeddings: rotate pairs of channels by an angle proportional to the position (start, start + 1, ...)
    T, hs = q.shape[-2], q.shape[-1]
    freqs = 10000.0 ** (-torch.arange(0, hs, 2, device=q.device, dtype=torch.float32) / hs)
    angles = torch.arange(start, start + T, device=q.device, dtype=torch.float32)[:, None] * freqs
    cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
    def rotate(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotate(q), rotate(k)

class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None):
        B, T, C = x.shape
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in self.c_attn(x).split(C, dim=2))
        start = cache[0].shape[2] if cache else 0  # GPT only: the number of positions before x in the cache
        q, k = rotary(q, k, start)
        if cache is not None:  # GPT only: sampling keeps the keys and values of every character, to compute each once
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = k, v
        # GPT only: after the cache's first call, x is the newest character alone, and it may see every key
        y = F.scaled_dot_product_attention(q, k, v, is_causal=CAUSAL and start == 0)  # no attention dropout: it halves CPU speed
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))

class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))

class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=False)
        self.attn = SelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=False)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):  # GPT only: cache
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))

class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=False)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        for name, p in self.named_parameters():  # GPT-2's init, residual projections scaled down by depth
            if name.endswith('bias'):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer) if name.endswith('c_proj.weight') else 0.02)

    def forward(self, idx, cache=None):
        """Logits of the next character at every position: (B, T, V). cache: see generate."""
        x = self.drop(self.wte(idx))
        for block, block_cache in zip(self.blocks, cache or [None] * len(self.blocks)):
            x = block(x, block_cache)
        return self.head(self.ln_f(x)).float()

def loss_fn(model, batch):
    """Next-character cross-entropy in nats, averaged over the positions of the batch."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))

# -----------------------------------------------------------------------------
# checkpoints

def save_checkpoint(path, ckpt):
    # temp file in the same folder, fsync, rename: an interrupted save never corrupts the old file
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'wb') as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

def load_checkpoint(path):
    if not os.path.exists(path):
        die(f'no checkpoint at {path}; train one with: python {KIND}.py --train')
    try:  # weights_only: a checkpoint is data, never code to run
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        die(f'{path} is not a readable checkpoint ({type(e).__name__}); delete it and train again: python {KIND}.py --train')
    if not isinstance(ckpt, dict) or 'kind' not in ckpt:
        die(f'{path} is not a checkpoint of this project; train one with: python {KIND}.py --train')
    if ckpt['kind'] != KIND:
        die(f'{path} holds a {ckpt["kind"]} model; load it with {ckpt["kind"]}.py')
    try:
        model = Transformer(Config(**ckpt['config']))
        model.load_state_dict({k: v.float() for k, v in ckpt['model'].items()})
    except (KeyError, TypeError, RuntimeError):
        die(f'{path} does not match this version of {KIND}.py; retrain with: python {KIND}.py --train')
    return model, ckpt

def default_checkpoint(out):
    return out if os.path.exists(out) else SHIPPED  # your own training run wins over the shipped weights

def autocast(device):
    # bfloat16 where the hardware has it; a CPU without it emulates it, several times slower than float32
    native = device.startswith('cuda') or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.autocast(device_type=device.split(':')[0], dtype=torch.bfloat16, enabled=native)

# -----------------------------------------------------------------------------
# training

def get_lr(it, args):
    if it < args.warmup_iters:
        return args.lr * (it + 1) / args.warmup_iters
    progress = min(1.0, (it - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters))
    return args.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)

@torch.no_grad()
def estimate_loss(model, split, args):
    model.eval()
    out = {}
    with torch.random.fork_rng(), autocast(args.device):  # leaves the training's random numbers alone: resuming is exact
        generator = torch.Generator().manual_seed(args.seed)  # the same batches at every evaluation
        for name, data in split.items():
            losses = [loss_fn(model, get_batch(data, args.batch_size, model.config.block_size, generator).to(args.device)).item()
                      for _ in range(args.eval_iters)]
            out[name] = float(np.mean(losses)) / math.log(2)
    model.train()
    return out

def train(args):
    ddp = 'RANK' in os.environ  # started by torchrun, which runs one process per device and numbers them
    if ddp:
        if args.device.startswith('cuda'):
            args.device = f'cuda:{os.environ["LOCAL_RANK"]}'  # this process's GPU on its machine
            torch.cuda.set_device(args.device)
        dist.init_process_group('nccl' if args.device.startswith('cuda') else 'gloo')
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    if rank:
        sys.stdout = open(os.devnull, 'w')  # rank 0 alone prints, evaluates and saves
    vocab, split = load_data(args.data_dir)
    if min(len(data) for data in split.values()) < args.block_size + EXTRA:
        die(f'--block-size {args.block_size} is longer than the validation text; use a smaller one or more text')
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    config = Config(vocab_size=len(vocab), **{k: getattr(args, k) for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'dropout')})
    model, step, summary = Transformer(config), 0, dict(tokens=0, seconds=0.0)
    if args.resume:
        model, ckpt = load_checkpoint(args.out)
        if ckpt['vocab'] != vocab:
            die(f'{args.out} was trained on another vocabulary than {args.data_dir}/; prepare the same text or train afresh without --resume')
        if not {'optimizer', 'rng'} <= ckpt.keys():
            die(f'{args.out} has no training state to resume (an exported checkpoint, like the shipped weights, keeps only the model); '
                'train afresh without --resume')
        config = model.config
    model = ddp_model = model.to(args.device)
    if ddp:  # backward() averages the gradients of all processes, so that every copy takes the same step
        ddp_model = nn.parallel.DistributedDataParallel(model)
        ddp_model.config = config  # diffusion.py's loss_fn reads model.config
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    if args.resume:
        optimizer.load_state_dict(ckpt['optimizer'])
        step, summary = ckpt['step'], ckpt['summary']
        generator.set_state(ckpt['rng']['batches'])
        torch.set_rng_state(ckpt['rng']['torch'])
        print(f'resuming {args.out} from step {step}')
    if rank:  # its own batches and noise. A checkpoint holds rank 0's random state only: a single process resumes
        seed = args.seed + rank + world * step  # step for step, other ranks start new streams, never ones used before
        generator.manual_seed(seed)
        torch.manual_seed(seed)
    print(f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {config}')

    def checkpoint(val_bpc):
        device = torch.cuda.get_device_name() if 'cuda' in args.device else f'{platform.machine()} CPU, {torch.get_num_threads()} threads'
        summary.update(val_bpc=val_bpc, hardware=f'{world} x {device}' if world > 1 else device)
        save_checkpoint(args.out, dict(kind=KIND, config=asdict(config), vocab=vocab, model=model.state_dict(),
                                       optimizer=optimizer.state_dict(), step=step, summary=summary,
                                       rng=dict(batches=generator.get_state(), torch=torch.get_rng_state())))

    stop, stopping = [], False  # Ctrl-C asks the loop to save and stop at the end of the current step
    signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    tokens_per_step = args.batch_size * args.grad_accum * world * config.block_size  # the global batch
    t0 = time.time()
    while step < args.max_iters and not stopping:
        optimizer.param_groups[0]['lr'] = get_lr(step, args)
        optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=args.device)
        for micro_step in range(args.grad_accum):  # the mean gradient of grad_accum batches, one after the other
            batch = get_batch(split['train'], args.batch_size, config.block_size, generator).to(args.device)
            if ddp:  # average the gradients across processes once, after the last batch
                ddp_model.require_backward_grad_sync = micro_step == args.grad_accum - 1
            with autocast(args.device):
                micro_loss = loss_fn(ddp_model, batch) / args.grad_accum
            micro_loss.backward()
            loss += micro_loss.detach()
        shared = torch.stack([loss, torch.tensor(float(bool(stop)), device=args.device)])
        if ddp:  # the mean loss, and Ctrl-C on any rank: all ranks must take the same branches below, or one
            dist.all_reduce(shared)  # would wait forever in an all-reduce that the others never join
        loss, stopping = shared[0].item() / world, shared[1].item() > 0
        if not math.isfinite(loss):
            die(f'loss became {loss} at step {step}; the last checkpoint saved is kept; try a lower --lr')
        nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        step += 1
        summary['tokens'] += tokens_per_step
        summary['seconds'] += time.time() - t0
        t0 = time.time()
        if step % 10 == 0 or step == args.max_iters:
            rate = summary['tokens'] / summary['seconds']
            eta = (args.max_iters - step) * tokens_per_step / rate
            print(f'step {step}/{args.max_iters} | loss {loss / math.log(2):.3f} bits/char | '
                  f'lr {get_lr(step - 1, args):.1e} | {rate / 1e3:.1f}k tok/s | ETA {eta / 60:.1f} min', flush=True)
        if rank == 0 and (step % args.eval_interval == 0 or step == args.max_iters or stopping):
            losses = estimate_loss(model, split, args)
            print(f'step {step}: train {losses["train"]:.3f}, val {losses["val"]:.3f} bits/char', flush=True)
            checkpoint(losses['val'])
            t0 = time.time()
    if rank == 0 and step == args.max_iters:  # the figure stored with the model: the whole validation set
        checkpoint(evaluate(model, args))
    print(f'{"interrupted; " if stopping else ""}saved {args.out} at step {step}' + (f'; continue with: python {" ".join(a for a in sys.argv if a != "--resume")} --resume' if stopping else ''))
    if ddp:
        dist.destroy_process_group()

@torch.no_grad()
def evaluate(model, args):
    """Validation loss in bits/char over every full batch of non-overlapping validation windows."""
    model.eval()
    _, split = load_data(args.data_dir)
    windows = val_windows(split['val'], model.config.block_size)
    batch_size, means = min(args.batch_size, len(windows)), []
    with torch.random.fork_rng(), autocast(args.device):
        for i in range(0, len(windows) - batch_size + 1, batch_size):
            means.append(loss_fn(model, windows[i:i + batch_size].to(args.device)).item() / math.log(2))
    print(f'validation loss: {np.mean(means):.4f} bits/char ({len(means)} batches of {batch_size} windows of {model.config.block_size})')
    model.train()
    return float(np.mean(means))

# -----------------------------------------------------------------------------
# sampling

@torch.no_grad()
def generate(model, num_samples, length, temperature=1.0, device='cpu', callback=None, prompt=()):
    """Continue the prompt (token ids) left to right up to `length` characters, one per forward pass.
    callback(step, x) sees every step. A key/value cache keeps what attention computed for the characters
    before, so each pass feeds only the newest one. When the context is full, a new one starts on the last
    half of the text, with an empty cache."""
    block = model.config.block_size
    x = torch.zeros(num_samples, 1 + length, dtype=torch.long, device=device)  # index 0 ('\n' for Shakespeare) starts every sample
    x[:, 1:1 + len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    start = fed = 0  # the context is x[:, start:i]; the cache holds the keys and values of x[:, start:fed]
    with autocast(device):  # entered once, so that it casts the weights to bfloat16 once, not at every character
        for step, i in enumerate(range(1 + len(prompt), 1 + length)):  # i: the position to sample
            if i - start > block:  # the context is full: a new one on the last half of the text
                start = fed = i - block // 2
            if fed == start:
                cache = [[] for _ in model.blocks]  # one per block, where its attention keeps [keys, values]
            logits = model(x[:, fed:i], cache)[:, -1]
            fed = i
            x[:, i] = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1)[:, 0]
            if callback:
                callback(step, x[:, 1:i + 1])
    return x[:, 1:]

def measure(model, sample):
    """Run sample() and return (its samples, forward passes, FLOPs, seconds). FLOPs are approximate: 2 x parameters
    x characters fed, a multiply and an add per weight per character (attention's own work is left out)."""
    fed = []
    hook = model.register_forward_hook(lambda module, inputs, output: fed.append(inputs[0].numel()))
    t0 = time.perf_counter()
    try:
        x = sample()
        if x.is_cuda:
            torch.cuda.synchronize()  # the GPU runs ahead of Python: wait for it before reading the clock
    finally:
        hook.remove()
    return x, len(fed), 2 * sum(p.numel() for p in model.parameters()) * sum(fed), time.perf_counter() - t0

# -----------------------------------------------------------------------------
# command line

def encode(text, vocab, flag):
    """The token ids of the text given with flag; one error line listing any characters the model does not know."""
    ids = {c: i for i, c in enumerate(vocab)}
    unknown = sorted(set(text) - set(ids))
    if unknown:
        die(f'{flag} has characters the model does not know: {" ".join(map(repr, unknown))}; use only characters of its training text')
    return [ids[c] for c in text]

def conditioning(args, vocab, block_size):
    """The length of the samples and the token ids of the prompt they start with."""
    prompt, length = encode(args.prompt or '', vocab, '--prompt'), args.length or block_size  # by default, one context
    if len(prompt) > block_size:
        die(f'--prompt has {len(prompt)} characters, more than the context of {block_size}; give a shorter one')
    if len(prompt) > length:
        die(f'--prompt has {len(prompt)} characters, more than --length {length}; ask for a longer text')
    return length, prompt

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--train', action='store_true', help='train a model and save it to --out')
    p.add_argument('--resume', action='store_true', help='with --train: continue from the checkpoint at --out')
    p.add_argument('--eval', action='store_true', help='print the validation loss of the checkpoint')
    p.add_argument('--ckpt', help=f'checkpoint to sample or evaluate (default: --out if it exists, else {SHIPPED})')
    p.add_argument('--export', metavar='PATH', help='save the checkpoint without its optimizer state, for shipping')
    p.add_argument('--num-samples', type=int, default=1)
    p.add_argument('--length', type=int, help='characters per sample (default: one context); longer texts are made window by window')
    p.add_argument('--prompt', help='text every sample starts with')
    p.add_argument('--temperature', type=float, default=1.0)
    for k, v in defaults.items():
        p.add_argument('--' + k.replace('_', '-'), type=type(v), default=v, help=f'default: {v}')
    args = p.parse_args(argv)
    if args.device != 'cpu' and not (args.device.startswith('cuda') and torch.cuda.is_available()):
        die(f'--device {args.device}: ' + ('CUDA is not available here' if args.device.startswith('cuda') else 'unknown device') + '; use --device cpu')
    for name in ('num_samples', 'max_iters', 'batch_size', 'grad_accum', 'eval_interval', 'eval_iters', 'n_layer', 'n_head', 'n_embd', 'block_size'):
        if getattr(args, name) < 1:
            die(f'--{name.replace("_", "-")} must be at least 1')
    if args.length is not None and not 1 <= args.length <= 10 ** 6:
        die(f'--length {args.length}: give 1 to 1,000,000 characters (a sample is kept in memory until it is printed)')
    if args.n_embd % (2 * args.n_head):
        die(f'--n-embd {args.n_embd} must be a multiple of 2 x --n-head ({args.n_head}): each head rotates pairs of channels')
    if args.temperature <= 0:
        die('--temperature must be above 0')
    return args

def main():
    args = parse_args()
    if args.train:
        return train(args)
    path = args.ckpt or default_checkpoint(args.out)
    model, ckpt = load_checkpoint(path)
    model = model.to(args.device).eval()
    s = ckpt['summary']
    print(f'loaded {path} (step {ckpt["step"]}, {s["tokens"] / 1e6:.1f}M tokens, {s["seconds"] / 60:.1f} min on {s.get("hardware")}, '
          f'val {s.get("val_bpc", float("nan")):.3f} bits/char)', file=sys.stderr)
    if args.export:
        if os.path.isdir(args.export):
            die(f'--export {args.export} is a folder; give a file name, e.g. {args.export}/{KIND}.pt')
        save_checkpoint(args.export, {k: v for k, v in ckpt.items() if k not in ('optimizer', 'rng')})
        return print(f'wrote {args.export}')
    if args.eval:
        return evaluate(model, args)
    length, prompt = conditioning(args, ckpt['vocab'], model.config.block_size)
    torch.manual_seed(args.seed)
    x, passes, flops, seconds = measure(model, lambda: generate(model, args.num_samples, length, args.temperature, args.device, prompt=prompt))
    for i, row in enumerate(x.tolist()):
        print(('' if i == 0 else '\n' + '-' * 40 + '\n') + ''.join(ckpt['vocab'][t] for t in row))
    print(f'{args.num_samples} x {length} characters in {seconds:.2f} s, {passes} forward passes, about {flops / 1e9:.3g} GFLOPs',
          file=sys.stderr)

if __name__ == '__main__':
    main()
