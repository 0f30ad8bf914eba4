"""
A character-level GPT: the autoregressive baseline that diffusion.py is compared with.

    python gpt.py --train     train on data/ (see prepare.py) and save out/gpt.pt
    python gpt.py             sample from out/gpt.pt, or the shipped weights/gpt.pt
    python gpt.py --eval      validation loss in bits per character

`diff gpt.py diffusion.py` shows every change that turns this model into a diffusion model.
"""
import plumbing  # first: from here on, Ctrl-C stops quietly, while torch loads too
import functools
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from plumbing import autocast, die, measure

KIND = 'gpt'
# hyperparameters; every one can be overridden on the command line, e.g. --max-iters 500
defaults = dict(
    n_layer=4, n_head=4, n_embd=256, block_size=256, dropout=0.1,  # model
    batch_size=32, max_iters=2500, lr=1e-3, min_lr=1e-4, warmup_iters=100,  # optimisation
    weight_decay=0.1, grad_clip=1.0, grad_accum=1,  # grad_accum: batches per step and process
    eval_interval=250, eval_iters=20, seed=1337,  # bookkeeping
    data_dir='data', out=f'out/{KIND}.pt', device=plumbing.best_device(),
    temperature=0.8,  # sampling: 1 draws from the model exactly, below sharper and less varied
)
SHIPPED = f'weights/{KIND}.pt'

# -----------------------------------------------------------------------------
# data

def load_data(data_dir):
    # prepare.py wrote the text as uint16 token ids, and the vocabulary that maps them to characters
    vocab, files = plumbing.data_files(data_dir)
    return vocab, {s: np.fromfile(path, dtype=np.uint16) for s, path in files.items()}

EXTRA = 1  # a window holds one character more than the context: the last target

def get_batch(data, batch_size, block_size, generator):
    ix = torch.randint(len(data) - block_size - EXTRA + 1, (batch_size,), generator=generator)
    windows = [data[i:i + block_size + EXTRA].astype(np.int64) for i in ix.tolist()]
    return torch.from_numpy(np.stack(windows))  # (B, T + EXTRA)

def val_windows(data, block_size):
    # non-overlapping windows covering the validation text, so --eval is deterministic
    n = (len(data) - EXTRA) // block_size
    text = torch.from_numpy(data[:n * block_size + EXTRA].astype(np.int64))
    return text.unfold(0, block_size + EXTRA, block_size)  # (n, T + EXTRA)

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

@functools.lru_cache(maxsize=1024)  # the same angles for every layer and pass: compute once
def rotary_angles(start, T, hs, device, dtype):
    freqs = 10000.0 ** (-torch.arange(0, hs, 2, device=device, dtype=torch.float32) / hs)
    angles = torch.arange(start, start + T, device=device, dtype=torch.float32)[:, None] * freqs
    return angles.cos().to(dtype), angles.sin().to(dtype)  # (T, hs / 2)

def rotary(q, k, start=0):
    # rotary position embeddings: rotate pairs of channels by an angle proportional to the
    # position (start, start + 1, ...), so attention sees how far apart two characters are
    cos, sin = rotary_angles(start, q.shape[-2], q.shape[-1], q.device, q.dtype)
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
        self.cache = None  # GPT only: while sampling, [keys, values] of the characters so far

    def forward(self, x):
        B, T, C = x.shape
        # (B, nh, T, hs) each
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for z in self.c_attn(x).split(C, dim=2))
        start = self.cache[0].shape[2] if self.cache else 0  # GPT only: positions in the cache
        q, k = rotary(q, k, start)
        if self.cache is not None:  # GPT only: then x is the newest character, which sees all keys
            if self.cache:
                k, v = torch.cat([self.cache[0], k], dim=2), torch.cat([self.cache[1], v], dim=2)
            self.cache[:] = k, v
        # no attention dropout: it halves the speed on a CPU
        y = F.scaled_dot_product_attention(q, k, v, is_causal=CAUSAL and start == 0)
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

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
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
        # GPT-2's initialisation, with the residual projections scaled down by depth
        for name, p in self.named_parameters():
            if name.endswith('bias'):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                deep = name.endswith('c_proj.weight')
                std = 0.02 / math.sqrt(2 * config.n_layer) if deep else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx):
        """Logits of the next character at every position: (B, T, V)."""
        x = self.wte(idx)  # (B, T, C)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x)).float()  # (B, T, V)

def loss_fn(model, batch):
    """Next-character cross-entropy in nats, averaged over the positions of the batch."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))

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
    # fork_rng leaves the training's random numbers alone, so resuming is exact
    with torch.random.fork_rng(), autocast(args.device):
        generator = torch.Generator().manual_seed(args.seed)  # the same batches every time
        for name, data in split.items():
            batches = [get_batch(data, args.batch_size, model.config.block_size, generator)
                       for _ in range(args.eval_iters)]
            losses = [loss_fn(model, batch.to(args.device)).item() for batch in batches]
            out[name] = float(np.mean(losses)) / math.log(2)
    model.train()
    return out

def train(args):
    rank, world = plumbing.start_processes(args)  # torchrun starts one process per device
    vocab, split = load_data(args.data_dir)
    plumbing.check_training(args, split, EXTRA)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    config = plumbing.model_config(Config, vocab, args)
    ckpt = None
    if args.resume:
        config, ckpt = plumbing.resumable(args, vocab, load_checkpoint)
    model = Transformer(config).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99),
                                  weight_decay=args.weight_decay)
    states = dict(model=model, optimizer=optimizer)
    step, summary = plumbing.restore(args, ckpt, generator, states)
    save = plumbing.saver(args, KIND, config, vocab, generator, states)
    print(f'{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {config}')
    ddp_model = plumbing.distribute(model)  # with torchrun, backward() averages the gradients
    stop = plumbing.StopRequest()  # Ctrl-C or SIGTERM: finish the step, save, then stop
    tokens = args.batch_size * args.grad_accum * world * config.block_size  # per step, all ranks
    progress, stopping = plumbing.Progress(args, summary, tokens, get_lr), False
    while step < args.max_iters and not stopping:
        optimizer.param_groups[0]['lr'] = get_lr(step, args)
        # the mean gradient of grad_accum batches, one after the other
        optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=args.device)
        for micro_step in range(args.grad_accum):
            batch = get_batch(split['train'], args.batch_size, config.block_size, generator)
            plumbing.sync_gradients(ddp_model, micro_step == args.grad_accum - 1)
            with autocast(args.device):
                micro_loss = loss_fn(ddp_model, batch.to(args.device)) / args.grad_accum
            micro_loss.backward()
            loss += micro_loss.detach()
        # every rank learns the mean loss, and whether any of them was asked to stop
        loss, stopping = stop.agree(loss, step, args.device)
        nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        step += 1
        progress.step(step, loss)
        # rank 0 evaluates and saves
        if rank == 0 and (step % args.eval_interval == 0 or step == args.max_iters or stopping):
            losses = estimate_loss(model, split, args)
            print(f'step {step}: train {losses["train"]:.3f}, val {losses["val"]:.3f} bits/char')
            save(step, summary, losses['val'])
            progress.pause()
    if rank == 0 and step == args.max_iters:  # the figure stored with the model: all of val
        save(step, summary, evaluate(model, args))
    plumbing.finish(args, step, stopping)

def evaluate(model, args):
    """Validation loss in bits/char over every full batch of non-overlapping validation windows."""
    windows = val_windows(load_data(args.data_dir)[1]['val'], model.config.block_size)
    return plumbing.evaluate(model, loss_fn, windows, args, 'validation loss')

# -----------------------------------------------------------------------------
# checkpoints

def load_checkpoint(path):
    return plumbing.load_checkpoint(path, KIND, lambda config: Transformer(Config(**config)))

def default_checkpoint(out):
    return out if os.path.exists(out) else SHIPPED  # your own training run wins over the shipped

# -----------------------------------------------------------------------------
# sampling

@torch.no_grad()
def generate(model, num_samples, length, temperature=1.0, device='cpu', callback=None, prompt=()):
    """Continue the prompt (token ids) left to right, one character per forward pass, feeding only
    the newest one: a key/value cache keeps the rest. callback(step, x) sees every step. When the
    context is full, a new one starts on the last half of the text, with an empty cache."""
    block = model.config.block_size
    # token 0 ('\n' in Shakespeare) starts every sample
    x = torch.zeros(num_samples, 1 + length, dtype=torch.long, device=device)
    x[:, 1:1 + len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    start = fed = 0  # the context is x[:, start:i]; the cache holds keys and values of start:fed
    # autocast entered once, so that it casts the weights to bfloat16 once, not at every character
    with autocast(device):
        for step, i in enumerate(range(1 + len(prompt), 1 + length)):  # i: the position to sample
            if i - start > block:  # the context is full: a new one on the last half of the text
                start = fed = i - block // 2
            if fed == start:  # an empty cache in every layer
                for layer in model.blocks:
                    layer.attn.cache = []
            logits = model(x[:, fed:i])[:, -1]  # (B, V)
            fed = i
            x[:, i] = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1)[:, 0]
            if callback:
                callback(step, x[:, 1:i + 1])
    for layer in model.blocks:
        layer.attn.cache = None  # training and evaluation feed whole windows
    return x[:, 1:]

# -----------------------------------------------------------------------------
# command line

def parse_args(argv=None):
    return plumbing.check_args(plumbing.parser(__doc__, defaults, SHIPPED).parse_args(argv))

def main():
    args = parse_args()
    if args.train:
        return train(args)
    path = args.ckpt or default_checkpoint(args.out)
    model, ckpt = load_checkpoint(path)
    model = model.to(args.device).eval()
    plumbing.describe(path, ckpt)
    if args.export:
        return plumbing.export(args.export, ckpt, KIND)
    if args.eval:
        return evaluate(model, args)
    length, prompt = plumbing.prompt(args, ckpt['vocab'], model.config.block_size)
    plumbing.check_sampling_memory(args.num_samples, length, model.config)
    torch.manual_seed(args.seed)
    x, passes, flops, seconds = measure(model, lambda: generate(
        model, args.num_samples, length, args.temperature, args.device, prompt=prompt))
    for i, row in enumerate(x.tolist()):
        print(('' if i == 0 else '\n' + '-' * 40 + '\n') + ''.join(ckpt['vocab'][t] for t in row))
    print(f'{args.num_samples} x {length} characters in {seconds:.2f} s, {passes} forward passes, '
          f'about {flops / 1e9:.3g} GFLOPs', file=sys.stderr)

if __name__ == '__main__':
    main()
