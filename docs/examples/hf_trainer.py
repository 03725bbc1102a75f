"""A Hugging Face Trainer run, watched by one callback (a tiny GPT-2 built from its config: no download).

THERMOSCOPE_COLLECTOR=127.0.0.1:50051 python docs/examples/hf_trainer.py
"""

import sys
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from thermoscope.integrations.hf import ThermoscopeCallback


def main(steps: int = 20, output_dir: str = "trainer_output", **settings: Any) -> Trainer:
    """`steps` optimizer steps of 2 micro-batches each; `settings` go to the callback."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    tokens = torch.randint(0, 64, (512, 8))
    data = [{"input_ids": t, "labels": t} for t in tokens]
    args = TrainingArguments(
        output_dir,
        run_name="tiny-gpt2",  # the job's name at the collector
        max_steps=steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
    )
    callback = ThermoscopeCallback(every=5, **settings)  # the one Thermoscope line
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    return trainer


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
