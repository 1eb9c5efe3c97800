"""channels_last vs contiguous (NCHW) for the vgg_variant train step on CPU: ms per step at width 0.25 (batch 64)
and width 1 (batch 640 = 64 images x TenCrop), 2 threads, same seed and inputs, in one process.

    python benchmarks/bench_channels_last.py
"""

import time

import torch
import torch.nn.functional as F

from fer_tune.models import create_model


def step_time(width: float, batch: int, channels_last: bool, steps: int) -> float:
    torch.manual_seed(0)
    model = create_model("vgg_variant", width=width, dropout=0.2)
    x, y = torch.rand(batch, 1, 40, 40), torch.randint(0, 7, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    for i in range(steps + 2):  # 2 warm-up steps
        if i == 2:
            t = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t) / steps


def main() -> None:
    torch.set_num_threads(2)
    for width, batch, steps in ((0.25, 64, 30), (1.0, 640, 2)):
        base = step_time(width, batch, False, steps)
        cl = step_time(width, batch, True, steps)
        print(
            f"width {width} batch {batch}: contiguous {base * 1000:.0f} ms/step, channels_last {cl * 1000:.0f} "
            f"ms/step ({base / cl:.2f}x)",
            flush=True,
        )


if __name__ == "__main__":
    main()
