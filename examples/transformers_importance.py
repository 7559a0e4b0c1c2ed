"""Importance sampling of whole sequences with the Hugging Face ``Trainer``: a tiny causal
language model built from a config (no download), trained on the Python standard
library's own source files, which every machine has offline.

    pip install 'fastis[transformers]' && python examples/transformers_importance.py

The one change from a plain ``Trainer`` script is the import of ``ImportanceTrainer``. It
scores each sequence by the norm of its summed token-loss gradient w.r.t. the logits and
weights the loss so that the gradient stays unbiased (gradient accumulation included).
"""

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments  # noqa: E402

from fastis.integrations.transformers import ImportanceTrainer as Trainer  # noqa: E402

SEQ_LEN = 64


class StdlibBytes(torch.utils.data.Dataset):
    """Byte-level sequences of ``SEQ_LEN`` from the standard library's ``.py`` files."""

    def __init__(self, max_bytes=400_000):
        root = Path(os.__file__).parent
        text = b""
        for path in sorted(root.glob("*.py")):
            text += path.read_bytes()
            if len(text) >= max_bytes:
                break
        ids = torch.frombuffer(bytearray(text[:max_bytes]), dtype=torch.uint8).long()
        self.ids = ids[: len(ids) // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(max_steps=60):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=SEQ_LEN, n_embd=64, n_layer=2, n_head=4)
    model = GPT2LMHeadModel(config)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=16,
            gradient_accumulation_steps=2,
            learning_rate=1e-3,
            max_steps=max_steps,
            logging_steps=20,
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            save_strategy="no",
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=StdlibBytes(),
            sampler_kwargs={"presample_size": 48, "seed": 0},
        )
        trainer.train()
        print({k: v for k, v in trainer.sampler.stats().items() if not isinstance(v, dict)})


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 60)
