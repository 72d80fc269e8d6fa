"""Watch δ in a Hugging Face run: a tiny GPT-2 trained by transformers.Trainer, with DeltaMonitorCallback.

The callback converts the model's layers to torchbp's at train begin and logs δ's statistics into the run's
TensorBoard directory (where ``report_to=["tensorboard"]`` writes the loss), at the Trainer's step numbers.
The model is built from a config (no download): 2 blocks, width 32, a 16-token vocabulary; it learns to
count (each sequence is k, k+1, k+2, ... mod 16), two batches per optimizer step.

    python examples/hf_gpt2.py [--steps 60] [--output-dir runs/hf_gpt2]
    tensorboard --logdir runs/hf_gpt2/runs
"""

import argparse
import glob
import os
import warnings

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

from torchbp.integrations.hf import DeltaMonitorCallback

VOCAB, LENGTH = 16, 24


class Counting(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        start = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
        self.ids = (start + torch.arange(LENGTH)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default: 60)")
    parser.add_argument("--every", type=int, default=10, help="log δ and the loss every this many steps")
    parser.add_argument("--output-dir", default="runs/hf_gpt2", help="the Trainer's output_dir")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=LENGTH)
    config.bos_token_id = config.eos_token_id = 0
    model = GPT2LMHeadModel(config)
    training = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        logging_steps=args.every,
        report_to=["tensorboard"],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=args.seed,
    )
    callback = DeltaMonitorCallback(every=args.every)
    trainer = Trainer(model=model, args=training, train_dataset=Counting(2048, args.seed), callbacks=[callback])
    hf_logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = max(glob.glob(os.path.join(args.output_dir, "runs", "*")), key=os.path.getmtime)
    events = EventAccumulator(run)
    events.Reload()
    layers = [tag.split("/", 1)[1] for tag in events.Tags()["scalars"] if tag.startswith("delta_norm/")]
    loss = events.Scalars("train/loss")
    print(f"logged to {run}: train/loss and δ of {len(layers)} layer(s) ({', '.join(layers[:4])}...)")
    print(f"train/loss: {loss[0].value:.3f} at step {loss[0].step} -> {loss[-1].value:.3f} at step {loss[-1].step}")
    norms = events.Scalars("delta_norm/lm_head")
    print(f"delta_norm/lm_head at steps {[e.step for e in norms]}: {', '.join(f'{e.value:.3g}' for e in norms)}")
    return {
        "run": run,
        "layers": layers,
        "loss": [e.value for e in loss],
        "loss_steps": [e.step for e in loss],
        "delta_steps": [e.step for e in norms],
    }


if __name__ == "__main__":
    main()
