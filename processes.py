"""The processes that train one run: this one alone, or torchrun's data parallelism
(docs/processes.md)."""
import os
import sys
import warnings

import torch

from config import UserError


class Processes:
    """The processes that train one run: this one alone, or those torchrun started (RANK,
    WORLD_SIZE, LOCAL_RANK), one per device, in a process group (gloo on CPU, NCCL on CUDA) that
    the context manager sets up and takes down. Rank 0 alone writes files and prints."""

    def __init__(self, device="cpu", environ=os.environ):
        self.launched = "RANK" in environ and "WORLD_SIZE" in environ
        self.rank, self.count = int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1))
        self.local_rank, self.per_machine = int(environ.get("LOCAL_RANK", 0)), int(environ.get("LOCAL_WORLD_SIZE", 1))
        self.device = device

    def check_batch(self, batch_size):
        """A UserError when a global batch does not split into equal parts, one per process."""
        if batch_size % self.count:
            raise UserError(f"the batch of {batch_size} does not divide over {self.count} processes; "
                            f"use a process count that divides it, or --set training.batch_size=N")

    def rows(self, n):
        """This process's rows of a global batch of n rows, as a slice."""
        size = n // self.count
        return slice(self.rank * size, (self.rank + 1) * size)

    def __enter__(self):
        if self.launched:
            if self.device == "cuda":
                if self.per_machine > torch.cuda.device_count():  # every process says so, rank 0 prints it
                    raise UserError(f"torchrun started {self.per_machine} processes on a machine with "
                                    f"{torch.cuda.device_count()} CUDA device(s): one process per GPU "
                                    f"(--nproc_per_node {torch.cuda.device_count()}), or --device cpu")
                torch.cuda.set_device(self.local_rank)
            torch.distributed.init_process_group("nccl" if self.device == "cuda" else "gloo")
            if self.rank:
                sys.stdout = open(os.devnull, "w")  # rank 0 prints for the run
        return self

    def __exit__(self, kind, error, trace):
        if self.launched:
            if kind is None or issubclass(kind, SystemExit):  # every rank is here: leave together
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def parallel(self, model):
        """`model` under DistributedDataParallel, which averages the gradients over the processes
        in backward (and makes every process start from rank 0's weights); `model` itself when alone."""
        if not self.launched:
            return model
        # attention's proj_out reads a transposed view, so its 1x1 weight's gradient comes with
        # other (equivalent) strides and DDP copies it into its bucket: a few KB, not worth a warning
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.local_rank] if self.device == "cuda" else None)

    def agree(self, loss, signum):
        """The mean of the processes' losses and the largest stop signal any received (0: none), so
        every process logs the same loss and all stop at the same step."""
        if not self.launched:
            return loss, signum
        values = torch.tensor([loss, float(signum)], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(values[:1])
        torch.distributed.all_reduce(values[1:], op=torch.distributed.ReduceOp.MAX)
        return values[0].item() / self.count, int(values[1].item())

    def from_rank_0(self, number):
        """Rank 0's `number` (an int) on every process."""
        if not self.launched:
            return number
        value = torch.tensor([number], dtype=torch.int64, device=self.device)
        torch.distributed.broadcast(value, src=0)
        return int(value.item())
