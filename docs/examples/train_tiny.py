"""Train a tiny 3-D CNN for a few steps on an imgindex export, on the CPU.

    python docs/examples/train_tiny.py imgindex-data/exports/mi_cad_ct.zarr --steps 20

It streams random 8x32x32 patches in Hounsfield units through PyTorch's DataLoader (two
worker processes, reproducible epochs) and regresses one label of the cohort, the days from
the index event to the series (``days_from_index``). The point is the plumbing, not the model.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader

from imgindex.datasets import EpochSampler, SeriesDataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", help="an export made by imgindex export")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--label", default="days_from_index")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    dataset = SeriesDataset(
        args.export,
        sample="patch",
        patch_size=(8, 32, 32),
        patches_per_volume=16,
        rescale=True,  # Hounsfield units for CT
        pad_value=-1000.0,  # air, where a patch runs past a small volume
        labels=[args.label],
    )
    sampler = EpochSampler(dataset, seed=0)
    loader = DataLoader(
        dataset, batch_size=4, sampler=sampler, num_workers=args.workers, drop_last=True
    )
    model = torch.nn.Sequential(
        torch.nn.Conv3d(1, 8, kernel_size=3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool3d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 1),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    step, epoch = 0, 0
    while step < args.steps:
        sampler.set_epoch(epoch)  # new patches and a new order each epoch, reproducibly
        for batch in loader:
            images = batch["image"].clamp(-1000, 1000).unsqueeze(1) / 1000.0  # (b, 1, z, y, x)
            target = batch[args.label].float().nan_to_num(0.0).unsqueeze(1)
            loss = torch.nn.functional.mse_loss(model(images), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            print(f"step {step} epoch {epoch} loss {loss.item():.3f}", flush=True)
            if step == args.steps:
                break
        epoch += 1


if __name__ == "__main__":
    main()
