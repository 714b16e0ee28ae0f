"""Model zoo: the small IOI transformer shipped with ``hydra_probe``.

``DEFAULT_MODEL_DIR`` holds a word-level GPT-2 style model trained by
``python -m hydra_probe.zoo.train`` (see ``default/training.json`` for the
recipe and self-check numbers). Load it offline with
``transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)`` and
``transformers.AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)``.
"""

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).parent / "default"
