"""Data-parallel runs on torch.distributed: `torchrun --nproc-per-node N streamquant run ...`.

Every rank streams the same blocks; the calibration and evaluation *windows* are what is split. Rank r holds the
contiguous share `[n·r/N, n·(r+1)/N)` of the (identically drawn, identically tokenized) windows in its own host
buffer, so the hidden states — the only thing that grows with the data — are 1/N per rank, and every forward pass
(capture, R2 probe, GPTQ Hessian passes, the quantized block, evaluation) is 1/N of the work.

What crosses ranks, and why this way:

* **Sampled rows (R1 reservoir, R2 o_proj inputs): gathered, not gradients reduced.** The rows are drawn exactly as a
  single process draws them: one seeded subset of *global* token indices. Each rank fills the rows that fall in its
  windows into a zeroed buffer of the full size, and a sum over ranks assembles the very reservoir one process would
  have captured (x + 0 = x: no rounding). R1/R2 training then runs on identical data on every rank (it is a small
  share of a run: ≤ 256 MiB of rows, a few hundred QR steps) and rank 0's result is broadcast, so the rotations are
  identical even where GPU kernels are not bitwise reproducible. All-reducing gradients instead would split every
  minibatch across ranks and change the optimisation with the world size; gathering keeps it the single-process one.
* **GPTQ Hessians: summed.** Each rank accumulates the plain sum Σ x xᵀ and the row count of its own windows; both
  are all-reduced (sum), which is exactly the single-process H = 2/N Σ x xᵀ up to fp32 summation order.
* **GPTQ solves: one owner per Hessian group, round-robin** (block · groups + group, mod N; a group's linears,
  q/k/v or gate/up, are one stacked scan). The owner solves and broadcasts codes, scales, zeros, the dequantized
  weight and the per-row losses; the others skip the solve.
* **Output and resume: rank 0 alone writes.** On --resume rank 0 reads the manifest and broadcasts the number of
  finished blocks, the saved R1 and each finished block's quantized weights (so the other ranks replay them without
  a shared filesystem).
* **Agreement before work:** the ranks compare a hash of the run identity, the micro-batch (the smallest planned
  by any rank, so the forwards are batched alike) and the calibration/evaluation token ids before any block runs.
* **Determinism:** every reduction has a fixed order (gloo and NCCL reduce in rank/ring order), so two runs with
  the same world size write the same bytes, and a killed group resumes to them. Results differ from a single
  process only by fp32 summation order (Hessian sums, batched forwards): not bitwise, within 0.5 % PPL.

Nothing is pickled: objects cross ranks as tensors, with a JSON header (names, shapes, dtypes) in a uint8 tensor.

Backends: NCCL when the run's device is CUDA (rank → `cuda:LOCAL_RANK`), gloo on CPU. Timeouts: every collective
waits at most `--dist-timeout` seconds (default 2 h). The longest legitimate waits are one GPTQ solve on its owner
(minutes for a 70B down_proj on a slow GPU), rank 0 writing a block, and the slowest rank's share of a pass; 2 h
covers them with room while a hung peer still ends the group. A rank that fails prints one line (its rank and the
error) and exits non-zero; torchrun then stops the other ranks, and a peer that is gone makes the survivors'
collectives fail at the latest after the timeout.

With one process (no torchrun) `Solo` is used: every method is the identity, so the single-process run computes
exactly what it computed before this module existed.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import replace

import torch

from streamquant.errors import UserError

DEFAULT_TIMEOUT_S = 7200
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float64, torch.float32, torch.bfloat16, torch.float16,
                                                       torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                                                       torch.bool)}


def launched() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class Solo:
    """One process: the whole data, no communication."""

    rank, world, local_rank = 0, 1, None

    @property
    def writes(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        return slice(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def mine(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's windows of a [windows, seqlen] tensor (all of them alone)."""
        return x

    def local_rows(self, rows: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, slice]:
        """Of sorted global token indices `rows`, those in [lo, hi) as local indices, and where they sit in `rows`."""
        return rows, slice(0, rows.numel())

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def reduce_hessian(self, gptq) -> None:
        pass

    def solve(self, key: int, fn):
        return fn()

    def same(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """Rank 0's tensor on every rank."""
        return t

    def from_rank0(self, tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        return tensors

    def resume_state(self, r1: torch.Tensor | None, done: int) -> tuple[torch.Tensor | None, int]:
        return r1, done

    def any(self, flag: bool) -> bool:
        return flag

    def agree(self, identity: dict, micro_batch: int, calib: torch.Tensor | None, evals: torch.Tensor | None) -> None:
        pass

    def assemble_windows(self, local: torch.Tensor, total: int) -> torch.Tensor:
        return local

    def fit_workload(self, work):
        return work

    def min_int(self, value: int) -> int:
        return value

    def report(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class Group(Solo):
    """One rank of a torch.distributed group started by torchrun."""

    def __init__(self, device: str, timeout_s: float):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        self.backend = "nccl" if cuda else "gloo"
        if cuda:
            if not torch.cuda.is_available():
                raise UserError(f"--device {device} asked for CUDA but no CUDA device is available")
            torch.cuda.set_device(self.local_rank)
        self.comm_device = torch.device("cuda", self.local_rank) if cuda else torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(self.backend, timeout=datetime.timedelta(seconds=timeout_s),
                                    **({"device_id": self.comm_device} if cuda else {}))
        self.timeout_s = timeout_s

    # ---- data ----
    def mine(self, x):
        return None if x is None else x[self.shard(x.shape[0])]

    def local_rows(self, rows, lo, hi):
        start, stop = int(torch.searchsorted(rows, lo)), int(torch.searchsorted(rows, hi))
        return rows[start:stop] - lo, slice(start, stop)

    def assemble_windows(self, local, total):
        """Per-window values of every rank, in window order: [total]."""
        full = torch.zeros(total, *local.shape[1:], dtype=local.dtype)
        full[self.shard(total)] = local
        return self.sum_(full)

    # ---- reductions ----
    def _collective(self, t: torch.Tensor, op) -> torch.Tensor:
        """Run `op(tensor)` on the communication device in chunks of ≤ 64 MiB, results back into `t` (in place)."""
        if t.device == self.comm_device and t.is_contiguous():
            op(t)
            return t
        flat = t.view(-1) if t.is_contiguous() else None
        if flat is None:
            raise ValueError("collectives need contiguous tensors")
        step = max(1, (64 << 20) // t.element_size())
        for s in range(0, flat.numel(), step):
            part = flat[s: s + step].to(self.comm_device)
            op(part)
            flat[s: s + step].copy_(part)
        return t

    def sum_(self, t):
        return self._collective(t, lambda x: self.dist.all_reduce(x, op=self.dist.ReduceOp.SUM))

    def _broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        return self._collective(t, lambda x: self.dist.broadcast(x, src=src))

    def reduce_hessian(self, gptq) -> None:
        self.sum_(gptq.S)
        if gptq.D is not None:
            self.sum_(gptq.D)
        n = torch.tensor([gptq.n_samples], dtype=torch.int64)
        gptq.n_samples = int(self.sum_(n)[0])

    def min_int(self, value):
        t = torch.tensor([value], dtype=torch.int64)
        self._collective(t, lambda x: self.dist.all_reduce(x, op=self.dist.ReduceOp.MIN))
        return int(t[0])

    def any(self, flag):
        t = torch.tensor([int(bool(flag))], dtype=torch.int64)
        self._collective(t, lambda x: self.dist.all_reduce(x, op=self.dist.ReduceOp.MAX))
        return bool(t[0])

    # ---- broadcasts (no pickle: JSON header + tensors) ----
    def broadcast_tensors(self, tensors: dict[str, torch.Tensor | None] | None, src: int) -> dict[str, torch.Tensor]:
        """`src`'s dict of tensors on every rank (None values and a None dict arrive as absent keys / {})."""
        header = b""
        if self.rank == src:
            tensors = {k: v for k, v in (tensors or {}).items() if v is not None}
            header = json.dumps([[k, list(v.shape), str(v.dtype).removeprefix("torch.")]
                                 for k, v in tensors.items()]).encode()
        size = self._broadcast(torch.tensor([len(header)], dtype=torch.int64), src)
        buf = torch.zeros(int(size[0]), dtype=torch.uint8)
        if self.rank == src:
            buf.copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        self._broadcast(buf, src)
        out = {}
        for name, shape, dtype in json.loads(bytes(buf.tolist()).decode() or "[]"):
            if self.rank == src:
                t = tensors[name].detach().cpu().contiguous().clone()
            else:
                t = torch.empty(shape, dtype=_DTYPES[dtype])
            out[name] = self._broadcast(t, src)
        return out

    def from_rank0(self, tensors):
        return self.broadcast_tensors(tensors, 0)

    def same(self, t):
        return self.broadcast_tensors({"t": t}, 0).get("t")

    def resume_state(self, r1, done):
        got = self.broadcast_tensors({"r1": r1, "done": torch.tensor([done], dtype=torch.int64)}, 0)
        return got.get("r1"), int(got["done"][0])

    def solve(self, key, fn):
        """GPTQ solve on the owner rank of `key`; its GPTQResult on every rank."""
        from streamquant.quant.gptq import GPTQResult

        owner = key % self.world
        result = fn() if self.rank == owner else None
        fields = None
        if result is not None:
            fields = {"q": result.q, "scale": result.scale, "zero": result.zero, "weight": result.weight,
                      "g_idx": result.g_idx, "row_loss": result.row_loss}
        got = self.broadcast_tensors(fields, owner)
        if result is not None:
            return result
        device = torch.device("cpu") if self.backend == "gloo" else self.comm_device
        return GPTQResult(q=got["q"], scale=got["scale"], zero=got.get("zero"), weight=got["weight"].to(device),
                          g_idx=got.get("g_idx"), row_loss=got["row_loss"])

    # ---- agreement ----
    def agree(self, identity, micro_batch, calib, evals):
        for name, x in (("--samples", calib), ("evaluation windows (--eval-windows)", evals)):
            if x is not None and x.shape[0] < self.world:
                raise UserError(f"{name}: {x.shape[0]} window(s) cannot be shared by {self.world} ranks; use at "
                                f"least {self.world} or fewer ranks")
        h = hashlib.sha256(json.dumps([identity, micro_batch], sort_keys=True, default=str).encode())
        for x in (calib, evals):
            h.update(b"-" if x is None else x.to(torch.int64).contiguous().numpy().tobytes())
        mine = torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8).to(torch.int64)
        ref = self.broadcast_tensors({"h": mine}, 0)["h"]
        differs = self.any(not torch.equal(ref, mine))
        if differs:
            raise UserError(f"the {self.world} ranks disagree on the run (options, plan or calibration/evaluation "
                            f"data): start every rank with the same command, files and versions")

    def fit_workload(self, work):
        """The planner plans one rank: the largest share of the windows' hidden states, the whole reservoir and
        R2 rows (every rank holds them assembled)."""
        return replace(work, ranks=self.world)

    def report(self):
        return {"distributed": {"world_size": self.world, "backend": self.backend, "timeout_s": self.timeout_s}}

    def close(self):
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


def join(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Solo:
    """The group this process belongs to: `Solo` unless torchrun started several processes."""
    if not launched():
        return Solo()
    if timeout_s <= 0:
        raise UserError(f"--dist-timeout must be positive (got {timeout_s})")
    return Group(device, timeout_s)
