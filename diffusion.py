"""
A character-level Score Entropy Discrete Diffusion model (SEDD, Lou, Meng & Ermon, arXiv:2310.16834),
made from the GPT of gpt.py. Instead of the next character, it estimates the concrete score
s(x_t)_y = p_t(y) / p_t(x_t): how much likelier the noisy text would be with one character changed to y.

    python diffusion.py --train     train on data/ (see prepare.py) and save out/diffusion.pt
    python diffusion.py             sample from out/diffusion.pt, or the shipped weights/diffusion.pt
    python diffusion.py --eval      validation NELBO (an upper bound on the loss) in bits per character
    python diffusion.py --infill "ROMEO:____________JULIET:"   fill in the _ with both sides in view

`diff gpt.py diffusion.py` shows every change; the equation numbers are the README's.
"""
import argparse
import copy
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

KIND = 'diffusion'
# hyperparameters; every one can be overridden on the command line, e.g. --max-iters 500
defaults = dict(
    n_layer=4, n_head=4, n_embd=256, block_size=256, dropout=0.0, graph='absorb',  # model; diffusion: noise is regularisation enough
    batch_size=32, max_iters=14000, lr=5e-4, min_lr=1e-4, warmup_iters=100,  # optimisation; diffusion: more steps, lower peak lr
    weight_decay=0.1, grad_clip=1.0, grad_accum=1,  # grad_accum: batches per step and process
    eval_interval=500, eval_iters=20, seed=1337,  # bookkeeping; diffusion: a longer run, evaluated less often
    data_dir='data', out='out/diffusion.pt', device='cuda' if torch.cuda.is_available() else 'cpu',
)
SHIPPED = 'weights/diffusion.pt'
EMA_DECAY = 0.999  # diffusion: sampling uses an average of the weights over about the last 1 / (1 - EMA_DECAY) steps

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

EXTRA = 0  # diffusion: a window is its own target, no shifted copy

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
    graph: str = 'absorb'  # diffusion: the forward process, 'uniform' (Q = J/N - I) or 'absorb' (mask)

CAUSAL = False  # diffusion: every position attends to the whole sequence

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

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in self.c_attn(x).split(C, dim=2))
        q, k = rotary(q, k)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=CAUSAL)  # no attention dropout: it halves CPU speed
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
        self.wte = nn.Embedding(config.vocab_size + (config.graph == 'absorb'), config.n_embd)  # diffusion: + mask
        self.noise_mlp = nn.Sequential(nn.Linear(64, config.n_embd), nn.SiLU(), nn.Linear(config.n_embd, config.n_embd))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=False)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        for name, p in self.named_parameters():  # GPT-2's init, residual projections scaled down by depth
            if name.endswith('bias'):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer) if name.endswith('c_proj.weight') else 0.02)

    def forward(self, idx, sigma_bar):
        """Log concrete scores log s(x_t)_y for every position and character y: (B, T, V)."""
        x = self.drop(self.wte(idx) + self.noise_mlp(noise_features(sigma_bar))[:, None])  # diffusion: knows the noise level
        for block in self.blocks:
            x = block(x)
        out = self.head(self.ln_f(x)).float()
        if self.config.graph == 'absorb':  # the exact form of its score at a mask: s_y = p(x_0 = y | x_t) / (e^sigma_bar - 1)
            return out.log_softmax(-1) - torch.log(torch.expm1(sigma_bar))[:, None, None]
        return out.scatter(-1, idx[..., None], 0.0)  # s(x_t) at y = x_t is p_t(x_t) / p_t(x_t) = 1

def noise_features(sigma_bar):
    # 64 sinusoidal features of log sigma_bar, periods from 0.6 to 600 (log sigma_bar spans about -9 to 3)
    freqs = 10 ** torch.linspace(1, -2, 32, device=sigma_bar.device)
    angles = torch.log(sigma_bar.float())[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)

# -----------------------------------------------------------------------------
# noise schedule, forward process, score entropy (diffusion only)

SIGMA_MIN, SIGMA_MAX = 1e-4, 20.0
T_EPS = 1e-5  # keeps t inside (0, 1), where every sigma_bar is finite and positive

def noise(t, graph):
    """Total noise sigma_bar(t) and its rate sigma(t) = d sigma_bar / dt."""
    if graph == 'uniform':  # geometric: sigma_bar(t) = smin^(1-t) smax^t
        sigma_bar = SIGMA_MIN ** (1 - t) * SIGMA_MAX ** t
        return sigma_bar, sigma_bar * math.log(SIGMA_MAX / SIGMA_MIN)
    return -torch.log1p(-t), 1 / (1 - t)  # absorb, log-linear: a character is masked with probability exactly t

def perturb(x0, sigma_bar, graph, vocab_size):
    """Draw x_t ~ p_t|0(. | x_0) independently at every position."""
    sigma_bar = sigma_bar[:, None]
    if graph == 'absorb':  # masked (token id vocab_size) with probability 1 - e^-sigma_bar
        return torch.where(torch.rand(x0.shape, device=x0.device) < -torch.expm1(-sigma_bar), vocab_size, x0)
    # uniform (Eq. 3): stays with probability e^-sigma_bar + (1 - e^-sigma_bar) / N, else moves to another
    move = torch.rand(x0.shape, device=x0.device) < -torch.expm1(-sigma_bar) * (1 - 1 / vocab_size)
    other = torch.randint(vocab_size - 1, x0.shape, device=x0.device)
    return torch.where(move, other + (other >= x0), x0)  # skipping x_0 makes "other" uniform over the rest

def score_entropy(log_score, sigma_bar, x_t, x0, graph):
    """Score entropy at every position, Eq. 7 without its factor sigma(t): (B, T). It sums over y != x_t
    Q(x_t, y) [s_y - a_y log s_y + K(a_y)], K(a) = a (log a - 1), a_y = p_t|0(y | x_0) / p_t|0(x_t | x_0),
    Q the rate matrix. Each term is a Bregman divergence: >= 0, and 0 exactly when s_y = a_y."""
    N = log_score.shape[-1]
    esm1 = torch.expm1(sigma_bar)[:, None]
    if graph == 'absorb':
        # only a mask can jump, to each real character at rate 1, and a_y = [y = x_0] / (e^sigma_bar - 1)
        a = 1 / esm1
        loss = log_score.exp().sum(-1) - a * log_score.gather(-1, x0[..., None]).squeeze(-1) + a * (torch.log(a) - 1)
        return torch.where(x_t == N, loss, 0.0)
    # uniform: Q(x_t, y) = 1/N for every y != x_t. The annotated notebook divides by N - 1 instead,
    # which makes its loss N/(N-1) times the bound; the rate matrix J/N - I gives 1/N.
    at = lambda idx: log_score.gather(-1, idx[..., None]).squeeze(-1)
    sum_s = log_score.exp().sum(-1) - at(x_t).exp()  # sums over y != x_t
    sum_log_s = log_score.sum(-1) - at(x_t)
    ratio = esm1 / (esm1 + N)  # (move / stay) of Eq. 3: a_y for every y when x_t = x_0
    log_ratio = torch.log(esm1) - torch.log(esm1 + N)
    stayed = sum_s - ratio * sum_log_s + (N - 1) * ratio * (log_ratio - 1)
    # x_t != x_0: a_y = 1 / ratio at y = x_0 and 1 for the other N - 2 characters (K(1) = -1)
    inv_ratio = 1 + N / esm1
    moved = sum_s - sum_log_s - (inv_ratio - 1) * at(x0) + inv_ratio * (-log_ratio - 1) - (N - 2)
    return torch.where(x_t == x0, stayed, moved) / N

def loss_fn(model, batch):
    """Diffusion-weighted score entropy (DWDSE) in nats per character, averaged over the batch. Its mean
    over t ~ U(0, 1) bounds -log p(x_0) / T from above (the NELBO), leaving out the prior term
    KL(p_1|0 || p_base): 0 for absorb, below 1e-7 nats for uniform at smax = 20."""
    B, graph = batch.shape[0], model.config.graph
    t = ((torch.arange(B, device=batch.device) + torch.rand(B, device=batch.device)) / B).clamp(T_EPS, 1 - T_EPS)  # stratified
    sigma_bar, sigma = noise(t, graph)
    x_t = perturb(batch, sigma_bar, graph, model.config.vocab_size)
    log_score = model(x_t, sigma_bar)
    return (sigma[:, None] * score_entropy(log_score, sigma_bar, x_t, batch, graph)).mean()

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
    config = Config(vocab_size=len(vocab), **{k: getattr(args, k) for k in ('n_layer', 'n_head', 'n_embd', 'block_size', 'dropout', 'graph')})  # diffusion: + graph
    model, step, summary = Transformer(config), 0, dict(tokens=0, seconds=0.0)
    if args.resume:
        model, ckpt = load_checkpoint(args.out)
        if ckpt['vocab'] != vocab:
            die(f'{args.out} was trained on another vocabulary than {args.data_dir}/; prepare the same text or train afresh without --resume')
        if not {'optimizer', 'rng'} <= ckpt.keys():
            die(f'{args.out} has no training state to resume (an exported checkpoint, like the shipped weights, keeps only the model); '
                'train afresh without --resume')
        config = model.config
    ema = copy.deepcopy(model).to(args.device)  # diffusion: a running average of the weights, which samples better
    if args.resume:  # diffusion: a checkpoint's 'model' is that average; the weights being trained are its 'raw'
        model.load_state_dict({k: v.float() for k, v in ckpt.get('raw', ckpt['model']).items()})
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
        save_checkpoint(args.out, dict(kind=KIND, config=asdict(config), vocab=vocab, model=ema.state_dict(), raw=model.state_dict(),  # diffusion: + raw
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
        with torch.no_grad():  # diffusion: move the average towards the new weights; early on, and in short runs, faster
            decay = min(EMA_DECAY, (1 + step) / (10 + step))
            for average, p in zip(ema.parameters(), model.parameters()):
                average.lerp_(p, 1 - decay)
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
            losses = estimate_loss(ema, split, args)  # diffusion: of the average, the weights that are saved
            print(f'step {step}: train {losses["train"]:.3f}, val {losses["val"]:.3f} bits/char', flush=True)
            checkpoint(losses['val'])
            t0 = time.time()
    if rank == 0 and step == args.max_iters:  # the figure stored with the model: the whole validation set
        checkpoint(evaluate(ema, args))  # diffusion: of the average
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
        torch.manual_seed(args.seed)  # diffusion: the loss draws t and x_t at random; the same draws every time
        for _ in range(args.eval_passes):  # diffusion: and it averages over them, so repeat
            for i in range(0, len(windows) - batch_size + 1, batch_size):
                means.append(loss_fn(model, windows[i:i + batch_size].to(args.device)).item() / math.log(2))
    nelbo, se = np.mean(means), np.std(means, ddof=1) / math.sqrt(len(means))
    print(f'validation NELBO: {nelbo:.4f} +- {se:.4f} bits/char ({len(means)} batches of {batch_size} windows of {model.config.block_size})')
    if os.path.exists('weights/gpt.pt'):  # diffusion: the baseline it is compared with
        print(f"the GPT of weights/gpt.pt: {torch.load('weights/gpt.pt', map_location='cpu', weights_only=True)['summary']['val_bpc']:.4f} bits/char")
    model.train()
    return float(nelbo)

# -----------------------------------------------------------------------------
# sampling

def tweedie_probs(score, x, dsigma, graph):
    """Unnormalised p(x_{t - dt} = y | x_t) = [exp(-dsigma Q) s]_y * exp(dsigma Q)(x_t, y) (Eq. 8)."""
    N = score.shape[-1]
    if graph == 'absorb':
        # worked out for the mask: it becomes y with probability (e^dsigma - 1) s_y; characters stay
        unmask = torch.expm1(dsigma) * score
        probs = torch.cat([unmask, 1 - unmask.sum(-1, keepdim=True)], dim=-1)
        return torch.where((x == N)[..., None], probs, F.one_hot(x, N + 1).to(probs))
    mean = score.mean(-1, keepdim=True)
    staggered = mean + dsigma.exp() * (score - mean)  # exp(-dsigma Q) = J/N + e^dsigma (I - J/N)
    transition = -torch.expm1(-dsigma) / N + (-dsigma).exp() * F.one_hot(x, N)  # exp(dsigma Q) = J/N + e^-dsigma (I - J/N)
    return staggered * transition

@torch.no_grad()
def generate(model, num_samples, length, steps=128, temperature=1.0, device='cpu', callback=None, given=None):
    """Denoise all positions at once with the Tweedie sampler. callback(step, x) sees every step.
    given: (length,) token ids to keep, and the mask id N at the positions to generate (by default, all of them).
    A text longer than the context is made window by window; each window keeps at least the last half of the one before."""
    N, graph, block = model.config.vocab_size, model.config.graph, model.config.block_size
    x = (torch.full((length,), N) if given is None else given).to(device).repeat(num_samples, 1)
    ts = torch.linspace(1 - T_EPS, T_EPS, steps + 1, device=device)
    new = block - block // 2  # the characters each window adds to the one before
    for start in [*range(0, length - block, new), max(length - block, 0)]:  # the last window ends with the text, full
        kept = x[:, start:start + block].clone()
        free = kept == N
        x_t = kept if graph == 'absorb' else torch.where(free, torch.randint(N, kept.shape, device=device), kept)
        for step in range(steps + 1):
            sigma_bar = noise(ts[step], graph)[0]
            dsigma = sigma_bar - (noise(ts[step + 1], graph)[0] if step < steps else 0)  # the last step goes to sigma_bar = 0
            with autocast(device):
                log_score = model(x_t, sigma_bar.expand(num_samples)) / temperature  # 1 is the exact model; below, sharper and less varied
            if graph == 'absorb':  # temper p(x_0 | x_t) alone, not the rate at which masks are removed
                log_score = log_score.log_softmax(-1) - torch.log(torch.expm1(sigma_bar))
            score = log_score.exp()
            probs = tweedie_probs(score, x_t, dsigma, graph)
            if step == steps and graph == 'absorb':
                probs = probs[..., :N]  # no mask survives the final step
            x_t = (probs.clamp(min=0) / torch.empty_like(probs).exponential_()).argmax(-1)  # a draw proportional to probs
            x_t = torch.where(free, x_t, kept)  # the given characters are put back after every step, as in SEDD's conditional sampler
            if callback:
                callback(step, x_t)
        x[:, start:start + block] = x_t
    return x

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
    """The length of the samples and the characters they keep: token ids, and len(vocab) (the mask) where to generate."""
    if args.infill is None:
        prompt, length = encode(args.prompt or '', vocab, '--prompt'), args.length or block_size  # by default, one context
        if not prompt and length > 1:  # diffusion: start with the GPT's start token ('\n' in Shakespeare), not mid-word
            prompt = [0]
        if len(prompt) > block_size:
            die(f'--prompt has {len(prompt)} characters, more than the context of {block_size}; give a shorter one')
        if len(prompt) > length:
            die(f'--prompt has {len(prompt)} characters, more than --length {length}; ask for a longer text')
        return length, torch.tensor(prompt + [len(vocab)] * (length - len(prompt)))
    # diffusion: a template, whose holes are filled with the text on both sides in view
    if args.prompt is not None or args.length is not None:
        die('--infill gives the whole text, and so its length; leave out --prompt and --length')
    if len(args.hole) != 1 or args.hole in vocab:
        die(f'--hole {args.hole!r} must be a single character that the model does not know, so that it cannot be meant as text')
    if args.hole not in args.infill:
        die(f'--infill has no {args.hole!r}; mark the characters to generate with it, or name another with --hole')
    if len(args.infill) > block_size:
        die(f'--infill has {len(args.infill)} characters, more than the context of {block_size}; give a shorter template')
    return len(args.infill), torch.tensor(encode(args.infill, vocab + args.hole, '--infill'))

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
    # diffusion: infilling, denoising steps and repeated evaluation
    p.add_argument('--infill', metavar='TEMPLATE', help='text to complete: --hole characters are generated, the others kept')
    p.add_argument('--hole', default='_', help='the character that marks a hole in --infill (default: _)')
    p.add_argument('--steps', type=int, default=128, help='denoising steps')
    p.add_argument('--eval-passes', type=int, default=20, help='with --eval: scores of each validation window')
    for k, v in defaults.items():
        p.add_argument('--' + k.replace('_', '-'), type=type(v), default=v, help=f'default: {v}')
    args = p.parse_args(argv)
    if args.device != 'cpu' and not (args.device.startswith('cuda') and torch.cuda.is_available()):
        die(f'--device {args.device}: ' + ('CUDA is not available here' if args.device.startswith('cuda') else 'unknown device') + '; use --device cpu')
    for name in ('num_samples', 'max_iters', 'batch_size', 'grad_accum', 'eval_interval', 'eval_iters', 'n_layer', 'n_head', 'n_embd', 'block_size', 'steps', 'eval_passes'):
        if getattr(args, name) < 1:
            die(f'--{name.replace("_", "-")} must be at least 1')
    if args.length is not None and not 1 <= args.length <= 10 ** 6:
        die(f'--length {args.length}: give 1 to 1,000,000 characters (a sample is kept in memory until it is printed)')
    if args.n_embd % (2 * args.n_head):
        die(f'--n-embd {args.n_embd} must be a multiple of 2 x --n-head ({args.n_head}): each head rotates pairs of channels')
    if args.temperature <= 0:
        die('--temperature must be above 0')
    if args.graph not in ('uniform', 'absorb'):  # diffusion: which forward process
        die(f'unknown --graph {args.graph!r}; use uniform or absorb')
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
        save_checkpoint(args.export, {k: v for k, v in ckpt.items() if k not in ('optimizer', 'rng', 'raw')})  # diffusion: + raw
        return print(f'wrote {args.export}')
    if args.eval:
        return evaluate(model, args)
    length, given = conditioning(args, ckpt['vocab'], model.config.block_size)  # diffusion: the characters to keep, a prompt or a template
    torch.manual_seed(args.seed)
    x, passes, flops, seconds = measure(model, lambda: generate(model, args.num_samples, length, args.steps, args.temperature, args.device, given=given))
    for i, row in enumerate(x.tolist()):
        print(('' if i == 0 else '\n' + '-' * 40 + '\n') + ''.join(ckpt['vocab'][t] for t in row))
    print(f'{args.num_samples} x {length} characters in {seconds:.2f} s, {passes} forward passes, about {flops / 1e9:.3g} GFLOPs',
          file=sys.stderr)

if __name__ == '__main__':
    main()
