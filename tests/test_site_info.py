"""`thermoscope_site_info{job_id,site,function,kind}`: what each activation site applies, on
/metrics, where the site label alone is a module path (in a `Sequential`, an index: `site="1"`)."""

from __future__ import annotations

import time

import torch
from torch import nn

from thermoscope.agent import Monitor

from helpers.metrics import scrape
from helpers.training import train_steps


def test_each_site_of_a_sequential_says_the_function_it_applies(collector) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU6(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    monitor = Monitor(model, opt, collector=collector.grpc_target, job="sites", every=1)
    try:
        train_steps(monitor, model, opt, 4)
        deadline = time.monotonic() + 30
        while True:
            sites = {
                (labels["site"], labels["function"], labels["kind"])
                for name, labels, value in (
                    (n, dict(ls), v) for (n, ls), v in scrape(collector.metrics_url).items()
                )
                if name == "thermoscope_site_info" and labels["job_id"] == "sites" and value == 1.0
            }
            if len(sites) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        monitor.close()
    assert sites == {("1", "ReLU6()", "ReLU6"), ("3", "Tanh()", "Tanh")}
