"""
What gpt.py and diffusion.py both need but that teaches nothing about GPTs or diffusion: checkpoint
and data files, argument and memory checks, torchrun set-up, stopping on Ctrl-C or SIGTERM, the
evaluation loop, timing and FLOP counting. Read the two scripts first; this is their plumbing.
"""
import os
import signal
import sys

# On a Mac's GPU (mps), an operation it lacks runs on the CPU instead of stopping the script. Read
# once, when torch loads: so set before torch is imported, and this module is imported first.
os.environ.setdefault('PYTORCH_ENABLE_MPS_FALLBACK', '1')

# Run as a script, Ctrl-C stops quietly from the start, while torch loads too. os._exit at once:
# an exception raised inside an import may be swallowed. Training replaces this to save first.
_main = getattr(sys.modules['__main__'], '__file__', None) or ''
if os.path.dirname(os.path.abspath(_main)) == os.path.dirname(os.path.abspath(__file__)):
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402


def die(msg):
    print(f'error: {msg}', file=sys.stderr)
    sys.exit(2)


def best_device():
    """The fastest device here: a CUDA GPU, else a Mac's GPU (mps), else the CPU."""
    if torch.cuda.is_available():
        return 'cuda'
    if torch.backends.mps.is_available():
        return 'mps'
    return 'cpu'


def available_devices():
    gpus = [f'cuda:{i}' for i in range(torch.cuda.device_count())]
    return ['cpu'] + gpus + (['mps'] if torch.backends.mps.is_available() else [])


def check_device(device):
    """One error line for a --device that is not one, or that this machine lacks."""
    if not re.fullmatch(r'cpu|cuda|cuda:[0-9]+|mps', device):
        die(f'unknown --device {device!r}; use cpu, cuda, cuda:N (GPU number N) or mps')
    here, (kind, _, index) = available_devices(), device.partition(':')
    named = f'cuda:{int(index or 0)}' if kind == 'cuda' else kind  # plain cuda: the first GPU
    if named not in here:
        what = "Apple's mps" if kind == 'mps' else f'CUDA GPU {index}' if index else 'CUDA'
        die(f'--device {device}: {what} is not available here (available: {", ".join(here)}); '
            f'use --device {best_device()}')


# --dtype, once check_args has read it; None: precision() chooses
DTYPE = None


def precision(device):
    """--dtype where given, else bfloat16 where the hardware computes in it, else float32.
    Emulated, bfloat16 is several times slower than float32 (seen on an AVX2-only CPU: 3.6x when
    sampling, 30x when training)."""
    if DTYPE:
        return getattr(torch, DTYPE)
    kind = device.split(':')[0]
    if kind == 'cuda':  # torch.cuda.is_bf16_supported(including_emulation=False), from torch 2.3:
        # GPUs before Ampere (compute capability 8) only emulate it; ROCm's have it
        native = bool(torch.version.hip) or torch.cuda.get_device_properties(device).major >= 8
    else:  # mps: float32; its bfloat16 depends on the macOS version, and was never tried here
        native = kind == 'cpu' and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.bfloat16 if native else torch.float32


def autocast(device):
    dtype = precision(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(':')[0], dtype=dtype)

# -----------------------------------------------------------------------------
# checkpoint files


def write_atomic(path, write, name=None, fix='free some space or give another path'):
    """write(f) into a temp file in the same folder, fsync, rename: an interrupted write never
    leaves half a file, and never corrupts the old one. A failure (a full disk, say) is one line."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        die(f'could not write {name or path} ({e.strerror or e}); {fix}')
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# 2: the absorbing network's output at position i scores character i + 1, as the GPT's does
FORMAT = 2


def save_checkpoint(path, ckpt):
    write_atomic(path, lambda f: torch.save(ckpt, f))


def load_checkpoint(path, kind, build):
    """(model, checkpoint dict) of the file at path, with one error line for anything wrong with it.
    build(config dict) makes the script's Transformer."""
    retrain = f'python {kind}.py --train'
    if not os.path.exists(path):
        die(f'no checkpoint at {path}; train one with: {retrain}')
    try:  # weights_only: a checkpoint is data, never code to run
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        die(f'{path} is not a readable checkpoint ({type(e).__name__}); '
            f'delete it and train again: {retrain}')
    if not isinstance(ckpt, dict) or 'kind' not in ckpt:
        die(f'{path} is not a checkpoint of this project; train one with: {retrain}')
    if ckpt['kind'] != kind:
        die(f'{path} holds a {ckpt["kind"]} model; load it with {ckpt["kind"]}.py')
    if isinstance(ckpt.get('config'), dict) and ckpt['config'].get('graph') == 'absorb' and (
            ckpt.get('format', 1) < FORMAT):
        die(f'{path} was trained by an earlier version of diffusion.py, before the GPT start; '
            f'train again with: {retrain}')
    try:
        model = build(ckpt['config'])
        model.load_state_dict({k: v.float() for k, v in ckpt['model'].items()})
    except (KeyError, TypeError, RuntimeError, AttributeError):
        die(f'{path} does not match this version of {kind}.py; retrain with: {retrain}')
    return model, ckpt


def start_weights(path, model, vocab):
    """diffusion.py --train: the weights to start from, --init. By default, for the absorbing graph,
    the GPT's that `python gpt.py` samples, its embedding given a row for the mask, the mean of the
    characters' rows; a diffusion checkpoint's of the same graph; or none: the model's own random
    weights, the uniform graph's default. Each checked against the run's settings and text."""
    config = model.config
    gpt = 'out/gpt.pt' if os.path.exists('out/gpt.pt') else 'weights/gpt.pt'
    path = path or (gpt if config.graph == 'absorb' else 'none')
    if path == 'none':
        print('starting from random weights')
        return model.state_dict()
    again = 'train the GPT on this data first (python gpt.py --train), or pass --init none'
    if not os.path.isfile(path):
        die(f'--init {path}: no such checkpoint; {again}')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
        kind, shape = ckpt['kind'], {k: ckpt['config'][k] for k in ('n_layer', 'n_head', 'n_embd')}
    except Exception as e:
        die(f'--init {path} is not a readable checkpoint of this project ({type(e).__name__}); '
            f'{again}')
    if kind == 'gpt' and config.graph != 'absorb':
        die(f'--init {path} is a GPT, and only the absorbing graph starts from the GPT; '
            'pass --init none, or a checkpoint of a uniform diffusion model')
    if kind == 'diffusion' and (ckpt['config'].get('graph') != config.graph
                                or (config.graph == 'absorb' and ckpt.get('format', 1) < FORMAT)):
        die(f'--init {path} is a diffusion model of another graph or an earlier version; give '
            f'one of --graph {config.graph}, or the GPT, or pass --init none')
    if kind not in ('gpt', 'diffusion') or ckpt['vocab'] != vocab or any(
            getattr(config, k) != v for k, v in shape.items()):
        die(f'--init {path} was trained on another text or with another shape than this run '
            f'(it has {", ".join(f"{k} {v}" for k, v in shape.items())}); {again}')
    weights = {k: v.float() for k, v in ckpt['model'].items()}
    if kind == 'gpt':
        wte = weights['wte.weight']  # (V, C)
        weights['wte.weight'] = torch.cat([wte, wte.mean(0, keepdim=True)])  # (V + 1, C)
    print(f'starting from the {"GPT" if kind == "gpt" else "diffusion model"} of {path}')
    return weights


def describe(path, ckpt):
    s = ckpt['summary']
    print(f'loaded {path} (step {ckpt["step"]}, {s["tokens"] / 1e6:.1f}M tokens, '
          f'{s["seconds"] / 60:.1f} min on {s.get("hardware")}, '
          f'val {s.get("val_bpc", float("nan")):.3f} bits/char)', file=sys.stderr)


def export(path, ckpt, kind):
    """Save the checkpoint without what only training needs (diffusion.py's 'raw' weights too):
    a .pt checkpoint, or, for a path ending in .safetensors, the float32 weights in that format,
    as diffusion.c reads them."""
    if os.path.isdir(path):
        die(f'--export {path} is a folder; give a file name, e.g. {path}/{kind}.pt')
    if path.endswith('.safetensors'):
        write_atomic(path, lambda f: f.write(safetensors_bytes(ckpt, kind)))
    else:
        save_checkpoint(path, {k: v for k, v in ckpt.items()
                               if k not in ('optimizer', 'rng', 'raw')})
    print(f'wrote {path}')


def safetensors_bytes(ckpt, kind):
    """The model's weights as a safetensors file: the size of the header (8 bytes, little-endian),
    the header (JSON, padded with spaces to a multiple of 8 bytes) giving each tensor's dtype, shape
    and data offsets, then the tensors' raw little-endian float32 data, in order. The header's
    __metadata__ (strings only) holds the kind, format, config (as JSON) and vocabulary."""
    meta = dict(kind=kind, format=str(ckpt.get('format', 1)), config=json.dumps(ckpt['config']),
                vocab=ckpt['vocab'])
    header, data, offset = {'__metadata__': meta}, [], 0
    for name, tensor in ckpt['model'].items():
        data.append(tensor.detach().float().cpu().contiguous().numpy().astype('<f4').tobytes())
        header[name] = dict(dtype='F32', shape=list(tensor.shape),
                            data_offsets=[offset, offset + len(data[-1])])
        offset += len(data[-1])
    text = json.dumps(header, ensure_ascii=False, separators=(',', ':')).encode('utf-8')
    text += b' ' * (-len(text) % 8)
    return len(text).to_bytes(8, 'little') + text + b''.join(data)


def model_config(config_class, vocab, args):
    """The model's settings, from the command line (gpt.py's, or diffusion.py's with its graph)."""
    names = [name for name in config_class.__dataclass_fields__ if name != 'vocab_size']
    return config_class(vocab_size=len(vocab), **{name: getattr(args, name) for name in names})


def resumable(args, vocab, load):
    """The checkpoint at --out, checked that training can continue from it, and its settings."""
    model, ckpt = load(args.out)
    if ckpt['vocab'] != vocab:
        die(f'{args.out} was trained on another vocabulary than {args.data_dir}/; '
            'prepare the same text or train afresh without --resume')
    if not {'optimizer', 'rng'} <= ckpt.keys():
        die(f'{args.out} has no training state to resume (an exported checkpoint, like the '
            'shipped weights, keeps only the model); train afresh without --resume')
    return model.config, ckpt


def restore(args, ckpt, generator, states):
    """Step, summary and every state (checkpoint key -> module or optimizer) where training left
    off, or a fresh start without ckpt. Ranks other than 0 then draw their own batches and noise."""
    step, summary = 0, dict(tokens=0, seconds=0.0)
    if ckpt:
        for key, obj in states.items():
            saved = ckpt.get(key, ckpt['model'])  # a file from before 'raw' was saved: its model
            if isinstance(obj, nn.Module):
                saved = {k: v.float() for k, v in saved.items()}
            try:
                obj.load_state_dict(saved)
            except (KeyError, ValueError, RuntimeError):
                die(f'{args.out} holds the training state of another version of this script; '
                    'sample from it or --export it, or train afresh without --resume')
        step, summary = ckpt['step'], ckpt['summary']
        generator.set_state(ckpt['rng']['batches'])
        torch.set_rng_state(ckpt['rng']['torch'])
        print(f'resuming {args.out} from step {step}')
    rank, world = ranks()
    if rank:  # a checkpoint holds rank 0's random state only: a single process resumes it exactly
        seed = args.seed + rank + world * step  # new streams, never ones used before
        generator.manual_seed(seed)
        torch.manual_seed(seed)
    return step, summary


def saver(args, kind, config, vocab, generator, states):
    """save(step, summary, val_bpc): rank 0 writes every state into the checkpoint at --out."""
    def save(step, summary, val_bpc):
        rank, world = ranks()
        if rank:
            return
        summary.update(val_bpc=val_bpc, hardware=hardware(args.device, world))
        ckpt = dict(kind=kind, config=asdict(config), vocab=vocab, step=step, summary=summary,
                    rng=dict(batches=generator.get_state(), torch=torch.get_rng_state()),
                    format=FORMAT)
        save_checkpoint(args.out, ckpt | {key: obj.state_dict() for key, obj in states.items()})
    return save


@torch.no_grad()
def update_average(ema, model, step, decay):
    # a running average of the weights; early on, and in short runs, it follows faster
    for average, p in zip(ema.parameters(), model.parameters()):
        average.lerp_(p, 1 - min(decay, (1 + step) / (10 + step)))


def hardware(device, world=1):
    """What the device is, for the checkpoint's summary and the training log."""
    if device.startswith('cuda'):
        name = torch.cuda.get_device_name(device)
    elif device == 'mps':
        name = 'Apple mps GPU'
    else:
        name = f'{platform.machine()} CPU, {torch.get_num_threads()} threads'
    return f'{world} x {name}' if world > 1 else name


def data_files(data_dir):
    """The vocabulary and the paths of train.bin and val.bin that prepare.py wrote, all checked."""
    again = 'run: python prepare.py (or python prepare.py --input FILE)'
    meta_path = os.path.join(data_dir, 'meta.json')
    if not os.path.exists(meta_path):
        die(f'no prepared data in {data_dir}/; {again}')
    try:
        with open(meta_path, encoding='utf-8') as f:
            meta = json.load(f)
        vocab, sizes = meta['vocab'], dict(train=meta['n_train'], val=meta['n_val'])
    except (OSError, ValueError, KeyError, TypeError) as e:
        die(f'{meta_path} is damaged ({type(e).__name__}); prepare the data again: {again}')
    files = {split: os.path.join(data_dir, f'{split}.bin') for split in sizes}
    for split, path in files.items():
        if not os.path.isfile(path) or os.path.getsize(path) != 2 * sizes[split]:
            die(f'{path} is missing or does not match {meta_path}; prepare the data again: {again}')
    return vocab, files


def check_training(args, split, extra):
    """Settings that would fail only later, once the training has run for a while."""
    if min(len(data) for data in split.values()) < args.block_size + extra:
        die(f'--block-size {args.block_size} is longer than the validation text; '
            'use a smaller one or more text')
    model = (f'training with --n-layer {args.n_layer} --n-embd {args.n_embd} --batch-size '
             f'{args.batch_size} --block-size {args.block_size}')
    check_memory(training_bytes(args), model,
                 'use a smaller model, or a smaller --batch-size with a larger --grad-accum')
    check_output(args.out)


@torch.no_grad()
def evaluate(model, loss_fn, windows, args, name, passes=1):
    """The mean loss of every full batch of windows, in bits/char; with passes > 1 (diffusion),
    its standard error too, and the GPT's figure for comparison."""
    model.eval()
    batch_size, means = min(args.batch_size, len(windows)), []
    with torch.random.fork_rng(), autocast(args.device):
        torch.manual_seed(args.seed)
        for _ in range(passes):
            for i in range(0, len(windows) - batch_size + 1, batch_size):
                loss = loss_fn(model, windows[i:i + batch_size].to(args.device))
                means.append(loss.item() / math.log(2))
    model.train()
    mean, spread = float(np.mean(means)), ''
    if passes > 1:
        spread = f' +- {np.std(means, ddof=1) / math.sqrt(len(means)):.4f}'
    T = model.config.block_size
    scored = f'; its last {T - 1} characters, given its first' if passes > 1 else ''  # diffusion
    print(f'{name}: {mean:.4f}{spread} bits/char ({len(means)} batches of {batch_size} windows '
          f'of {T}{scored})')
    if passes > 1 and os.path.exists('weights/gpt.pt'):
        gpt = torch.load('weights/gpt.pt', map_location='cpu', weights_only=True)
        print(f'the GPT of weights/gpt.pt: {gpt["summary"]["val_bpc"]:.4f} bits/char')
    return mean


def check_output(out):
    """Fail now, not at the first save after the training has run, if --out cannot be written: make
    its folder and a file in it, as the save will, then remove both. Nothing is left behind."""
    if os.path.isdir(out):
        die(f'--out {out} is a folder; give a file name, e.g. {os.path.join(out, "model.pt")}')
    folder = target = os.path.dirname(os.path.abspath(out))
    missing = []  # the folders to make, the innermost first
    # a drive that is missing (Windows) is its own parent: stop there, the probe will fail
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        missing.append(folder)
        folder = os.path.dirname(folder)
    if os.path.exists(folder) and not os.path.isdir(folder):
        die(f'--out {out} cannot be written: {folder} is a file, not a folder; give another path')
    if ranks()[0]:
        return  # rank 0 alone saves; another rank's probe could remove a folder rank 0 uses
    # a real file, not os.access: root, read-only filesystems and Windows all answer it wrongly
    try:
        os.makedirs(target, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target) as f:
            f.write(b'probe')
    except OSError as e:
        where = f'{e.filename}: ' if e.filename else ''
        die(f'--out {out} cannot be written ({where}{e.strerror or e}); give another path')
    finally:
        for made in missing:
            with contextlib.suppress(OSError):
                os.rmdir(made)


# -----------------------------------------------------------------------------
# torchrun: one process per device, numbered by RANK


def ranks():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def start_processes(args):
    """Join the other processes when started by torchrun. Rank 0 alone prints, evaluates, saves."""
    if 'RANK' in os.environ and not dist.is_initialized():
        if args.device.startswith('cuda'):
            args.device = f'cuda:{os.environ["LOCAL_RANK"]}'  # this process's GPU on its machine
            torch.cuda.set_device(args.device)
        dist.init_process_group('nccl' if args.device.startswith('cuda') else 'gloo')
    rank, world = ranks()
    if rank:
        sys.stdout = open(os.devnull, 'w')
    elif hasattr(sys.stdout, 'reconfigure'):
        sys.stdout.reconfigure(line_buffering=True)  # a log file follows the training line by line
    return rank, world


def distribute(model):
    """With torchrun, a wrapper whose backward() averages the gradients of all processes, so that
    every copy takes the same step."""
    if not dist.is_initialized():
        return model
    wrapped = nn.parallel.DistributedDataParallel(model)
    wrapped.config = model.config  # the loss functions read model.config
    return wrapped


def sync_gradients(model, now):
    # average the gradients across processes once per step, after the last of its batches
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = now


def finish(args, step, stopping):
    if stopping:
        resume = ' '.join(a for a in sys.argv if a != '--resume') + ' --resume'
        print(f'interrupted; saved {args.out} at step {step}; continue with: python {resume}')
    else:
        print(f'saved {args.out} at step {step}')
    if dist.is_initialized():
        # no rank leaves while rank 0 still evaluates and saves: a process group torn down under
        # a rank that still uses it can abort that rank
        dist.barrier()
        dist.destroy_process_group()

# -----------------------------------------------------------------------------
# stopping: Ctrl-C (SIGINT) or SIGTERM (schedulers, docker stop, kill) finish the step and save


class StopRequest:
    def __init__(self):
        self.asked = False
        # where this platform's signal module has no SIGTERM, Ctrl-C alone (nothing sends it on
        # Windows, though Python names it there)
        for sig in (signal.SIGINT, getattr(signal, 'SIGTERM', None)):
            if sig is not None:
                signal.signal(sig, self.ask)

    def ask(self, *_):
        self.asked = True

    def agree(self, loss, step, device):
        """(mean loss over processes, whether any process was asked to stop). All ranks must take
        the same branches after a step, or one would wait forever for the others."""
        shared = torch.stack([loss, torch.tensor(float(self.asked), device=device)])
        if dist.is_initialized():
            dist.all_reduce(shared)
        loss = shared[0].item() / ranks()[1]
        if not math.isfinite(loss):
            die(f'loss became {loss} at step {step}; the last checkpoint saved is kept; '
                'try a lower --lr')
        return loss, shared[1].item() > 0

# -----------------------------------------------------------------------------
# timing and FLOP counting


class Progress:
    """Counts tokens and seconds into the summary, and prints a line every 10 steps."""

    def __init__(self, args, summary, tokens_per_step, lr):
        self.args, self.summary, self.tokens_per_step, self.lr = args, summary, tokens_per_step, lr
        precision_name = str(precision(args.device)).removeprefix('torch.')
        print(f'training on {args.device} ({hardware(args.device, ranks()[1])}, {precision_name})')
        self.t0 = time.time()

    def step(self, step, loss):
        self.summary['tokens'] += self.tokens_per_step
        self.summary['seconds'] += time.time() - self.t0
        self.t0 = time.time()
        if step % 10 == 0 or step == self.args.max_iters:
            rate = self.summary['tokens'] / self.summary['seconds']
            eta = (self.args.max_iters - step) * self.tokens_per_step / rate
            print(f'step {step}/{self.args.max_iters} | loss {loss / math.log(2):.3f} bits/char | '
                  f'lr {self.lr(step - 1, self.args):.1e} | {rate / 1e3:.1f}k tok/s | '
                  f'ETA {eta / 60:.1f} min', flush=True)

    def pause(self):
        self.t0 = time.time()  # evaluating and saving is not training time


def measure(model, sample):
    """Run sample() and return (its samples, forward passes, FLOPs, seconds). FLOPs are
    approximate: 2 x parameters x characters fed, a multiply and an add per weight per character
    (attention's own work is left out)."""
    fed = []
    hook = model.register_forward_hook(lambda _, inputs, out: fed.append(inputs[0].numel()))
    t0 = time.perf_counter()
    try:
        with out_of_memory('sampling', 'ask for fewer --num-samples or a shorter --length'):
            x = sample()
        if x.device.type in ('cuda', 'mps'):  # the GPU runs ahead of Python: wait for it
            getattr(torch, x.device.type).synchronize()
    finally:
        hook.remove()
    flops = 2 * sum(p.numel() for p in model.parameters()) * sum(fed)
    return x, len(fed), flops, time.perf_counter() - t0


class out_of_memory:
    """A context in which running out of memory is one error line instead of a traceback."""

    def __init__(self, what, fix):
        self.what, self.fix = what, fix

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if isinstance(error, MemoryError) or (
                isinstance(error, RuntimeError) and 'alloc' in str(error).lower()):
            die(f'{self.what} ran out of memory; {self.fix}')
        return False


def training_bytes(args):
    # what backward() keeps of each window, per layer: about 40 floats per channel and position,
    # and the attention weights; doubled for the gradients and the optimizer's work
    T, C = args.block_size, args.n_embd
    per_window = args.n_layer * T * (40 * C + 2 * args.n_head * T) * 4
    # and 12 C^2 weights per layer, each with its gradient, the optimizer's two moments, an average
    weights = 12 * args.n_layer * C * C * 4 * 5
    return 2 * args.batch_size * per_window + weights


def check_sampling_memory(num_samples, length, config):
    # the text, and per sample one context's activations: about 16 floats per channel and 8 per
    # character of the vocabulary at every position, plus attention weights
    T = config.block_size
    per_sample = 8 * length + 4 * T * (16 * config.n_embd + 8 * (config.vocab_size + 1))
    per_sample += 4 * config.n_head * T * T
    check_memory(num_samples * per_sample, f'{num_samples} samples of {length} characters',
                 'ask for fewer --num-samples or a shorter --length')


def free_memory():
    """Bytes of memory free here: Linux says in /proc/meminfo; elsewhere, where os.sysconf knows
    (macOS), all of it, free or not; None where neither does (Windows has neither)."""
    try:
        with open('/proc/meminfo') as f:
            line = next(line for line in f if line.startswith('MemAvailable'))
            return int(line.split()[1]) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    sysconf = getattr(os, 'sysconf', None)
    try:
        return sysconf('SC_PHYS_PAGES') * sysconf('SC_PAGE_SIZE') if sysconf else None
    except (OSError, ValueError):  # a name this system does not know
        return None


def check_memory(bytes_needed, what, fix):
    """One line before a request that cannot fit in this machine's memory, instead of a traceback
    from the allocator (or the system's out-of-memory killer) part way through. Skipped where the
    memory free cannot be known."""
    free = free_memory()
    if free is not None and bytes_needed > free:
        die(f'{what} would need about {bytes_needed / 1e9:,.1f} GB of memory, more than the '
            f'{free / 1e9:,.1f} GB free here; {fix}')

# -----------------------------------------------------------------------------
# command line


def encode(text, vocab, flag):
    """The token ids of the text given with flag; one error line listing unknown characters."""
    ids = {c: i for i, c in enumerate(vocab)}
    unknown = sorted(set(text) - set(ids))
    if unknown:
        die(f'{flag} has characters the model does not know: {" ".join(map(repr, unknown))}; '
            'use only characters of its training text')
    return [ids[c] for c in text]


def template(args, vocab, block_size):
    """The token ids of an --infill template, its --hole characters as the mask, len(vocab)."""
    if args.prompt is not None or args.length is not None:
        die('--infill gives the whole text, and so its length; leave out --prompt and --length')
    if len(args.hole) != 1 or args.hole in vocab:
        die(f'--hole {args.hole!r} must be a single character that the model does not know, '
            'so that it cannot be meant as text')
    if args.hole not in args.infill:
        die(f'--infill has no {args.hole!r}; mark the characters to generate with it, '
            'or name another with --hole')
    if len(args.infill) > block_size:
        die(f'--infill has {len(args.infill)} characters, more than the context of '
            f'{block_size}; give a shorter template')
    return encode(args.infill, vocab + args.hole, '--infill')


def prompt(args, vocab, block_size):
    """gpt.py: the length of the samples and the token ids of the prompt they start with."""
    length = args.length or block_size  # by default, one context
    ids = encode(args.prompt or '', vocab, '--prompt')
    if len(ids) > block_size:
        die(f'--prompt has {len(ids)} characters, more than the context of {block_size}; '
            'give a shorter one')
    if len(ids) > length:
        die(f'--prompt has {len(ids)} characters, more than --length {length}; '
            'ask for a longer text')
    return length, ids


def given(args, vocab, block_size):
    """diffusion.py: the length of the samples and the characters they keep, as token ids, with
    the mask id len(vocab) where to generate: a prompt and then masks, or an --infill template
    whose holes are the masks."""
    if args.infill is not None:
        return len(args.infill), torch.tensor(template(args, vocab, block_size))
    length, ids = prompt(args, vocab, block_size)
    # by default one context, the start token and then the text
    length = args.length or max(block_size - 1, len(ids))
    return length, torch.tensor(ids + [len(vocab)] * (length - len(ids)))


def parser(doc, defaults, shipped):
    """The flags both scripts have: what to do, what to sample, and every default, e.g. --lr."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--train', action='store_true', help='train a model and save it to --out')
    p.add_argument('--resume', action='store_true', help='with --train: continue from --out')
    p.add_argument('--eval', action='store_true', help="print the checkpoint's validation loss")
    p.add_argument('--ckpt', help=f'checkpoint to sample or evaluate (default: --out if it exists, '
                                  f'else {shipped})')
    p.add_argument('--export', metavar='PATH',
                   help='save the checkpoint without its optimizer state, for shipping')
    p.add_argument('--dtype', help='float32 or bfloat16, of the matrix products (default: '
                                   'bfloat16 where the hardware computes in it, else float32)')
    p.add_argument('--num-samples', type=int, default=1)
    p.add_argument('--length', type=int, help='characters per sample (default: one context); '
                                              'longer texts are made window by window')
    p.add_argument('--prompt', help='text every sample starts with')
    if 'graph' in defaults:  # diffusion.py's own: infilling, denoising steps, repeated evaluation
        p.add_argument('--infill', metavar='TEMPLATE',
                       help='text to complete: --hole characters are generated, the others kept')
        p.add_argument('--hole', default='_', help='marks a hole in --infill (default: _)')
        p.add_argument('--steps', type=int, default=128, help='denoising steps')
        p.add_argument('--eval-passes', type=int, default=20,
                       help='with --eval: scores of each validation window')
        p.add_argument('--init', metavar='CKPT',
                       help='with --train: the weights to start from: a GPT (absorbing graph; '
                            'default: out/gpt.pt if it exists, else weights/gpt.pt), a diffusion '
                            'checkpoint, or none for random weights (the uniform default)')
    for k, v in defaults.items():
        if k == 'order':  # diffusion.py: the absorbing graph's; the uniform graph has no masks
            p.add_argument('--order', help=f'which masks a step reveals: {", ".join(ORDERS)} '
                                           f'(default: {v}; the uniform graph: random)')
        else:
            p.add_argument('--' + k.replace('_', '-'), type=type(v), default=v,
                           help=f'default: {v}')
    return p


ORDERS = ('random', 'confidence', 'left-to-right')


def sampling_order(args, graph, default):
    """diffusion.py: --order, else its default; a uniform-graph sampler has no masks to order."""
    if graph == 'uniform' and args.order not in (None, 'random'):
        die(f'--order {args.order} orders the masks of the absorbing graph; a uniform-graph model '
            'has none: leave out --order, or give --order random')
    return 'random' if graph == 'uniform' else args.order or default


# the float flags and their ranges: (name, low, high, low included, high included)
FLOAT_RANGES = [('lr', 0, math.inf, False, False), ('min_lr', 0, math.inf, True, False),
                ('temperature', 1e-3, 1e3, True, True), ('dropout', 0, 1, True, False),
                ('weight_decay', 0, math.inf, True, False),
                ('grad_clip', 0, math.inf, False, False),
                ('confidence_noise', 0, math.inf, True, False)]
POSITIVE = ('num_samples', 'max_iters', 'batch_size', 'grad_accum', 'eval_interval', 'eval_iters',
            'n_layer', 'n_head', 'n_embd', 'block_size')


def check_args(args):
    """One error line for any flag out of its range, before anything runs."""
    global DTYPE
    flag = lambda name: '--' + name.replace('_', '-')  # noqa: E731
    check_device(args.device)
    if args.dtype not in (None, 'float32', 'bfloat16'):
        die(f'unknown --dtype {args.dtype!r}; use float32 or bfloat16')
    DTYPE = args.dtype
    for name in POSITIVE + ('steps', 'eval_passes'):
        if getattr(args, name, 1) < 1:
            die(f'{flag(name)} must be at least 1')
    if getattr(args, 'graph', 'absorb') not in ('uniform', 'absorb'):
        die(f'unknown --graph {args.graph!r}; use uniform or absorb')
    if args.warmup_iters < 0:
        die(f'--warmup-iters {args.warmup_iters} must be 0 or more')
    if not 0 <= args.seed < 2 ** 63:
        die(f'--seed {args.seed} must be from 0 to 2**63 - 1')
    if getattr(args, 'order', None) not in (None, *ORDERS):
        die(f'unknown --order {args.order!r}; use {", ".join(ORDERS)}')
    if getattr(args, 'order', None):
        sampling_order(args, args.graph, None)  # --graph uniform has no masks to order
    for name, low, high, with_low, with_high in FLOAT_RANGES:
        if not hasattr(args, name):  # a flag of the other script
            continue
        value = getattr(args, name)
        above = low <= value if with_low else low < value
        inside = above and (value <= high if with_high else value < high)
        if not inside:
            where = f'{"[" if with_low else "("}{low:g}, {high:g}{"]" if with_high else ")"}'
            die(f'{flag(name)} {value}: give a number in {where}')
    if args.min_lr > args.lr:
        die(f'--min-lr {args.min_lr} is above --lr {args.lr}; the learning rate decays from --lr '
            'down to --min-lr')
    if args.length is not None and not 1 <= args.length <= 10 ** 6:
        die(f'--length {args.length}: give 1 to 1,000,000 characters '
            '(a sample is kept in memory until it is printed)')
    if args.n_embd % (2 * args.n_head):
        die(f'--n-embd {args.n_embd} must be a multiple of 2 x --n-head ({args.n_head}): '
            'each head rotates pairs of channels')
    return args
