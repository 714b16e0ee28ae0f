"""The catalogue of bad inputs hydra_probe refuses, run for real to print docs/errors.md.

Usage (from the repository root)::

    python analyses/error_catalogue.py > docs/errors.md

Every entry is a piece of code a user might write, run here on a tiny
random GPT-2 (``tests/tiny.py``: 2 layers, 2 heads, word-level tokenizer),
with the exception class it must raise and the key words its message must
contain. The page shows the code, the class and the message exactly as raised,
so it is never typed by hand. ``tests/test_errors.py`` runs the same entries
and checks, for each, the class, the key words, that no forward pass ran
before the error (where ``before_work``), that no file was written and that
the model was left without hooks; it also checks that the page is current.
The command-line entries (``CLI_ENTRIES``) run ``hydra_probe.cli.main`` on a
tiny model folder and record the exit code and the one-line message
(``tests/test_cli_errors.py`` checks them, and one of them in a real
subprocess).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


@dataclass(frozen=True)
class Entry:
    """One bad input: ``setup`` then ``code`` run in one namespace must raise ``error``."""

    key: str
    section: str
    title: str
    code: str
    error: str
    words: tuple[str, ...]
    setup: str = ""
    before_work: bool = True  # raised before any forward pass
    portable: bool = True  # the message is the same on every machine (False: it depends on the devices present)


@dataclass(frozen=True)
class CliEntry:
    """One bad command line: exit code ``code``, a one-line message holding ``words``, no output left.

    Runs in a fresh folder that holds ``tiny/`` (a tiny GPT-2 saved with its
    tokenizer); ``--model tiny`` is added unless the args name a model.
    ``out`` is the output folder the command would write (it must not appear,
    or stay as ``setup`` made it).
    """

    key: str
    title: str
    args: tuple[str, ...]
    words: tuple[str, ...]
    setup: str = ""
    out: str | None = None
    code: int = 2
    portable: bool = True


TINY = "m = tiny.model('gpt2', layers=2, heads=2, d=16); task = tiny.ioi(m, 4)"

ENTRIES: list[Entry] = [
    # ------------------------------------------------------------------ components
    Entry("unknown-component", "Components", "An unknown component name",
          "hp.ablate(m, task, 'H3')", "ComponentError", ("unknown component", "'H3'", "valid names", "0..1")),
    Entry("lowercase-component", "Components", "A name in the wrong case",
          "hp.ablate(m, task, 'l0h1')", "ComponentError", ("unknown component", "L{layer}H{head}")),
    Entry("layer-out-of-range", "Components", "A layer the model does not have",
          "hp.self_repair(m, task, 'L7H0')", "ComponentError", ("layer 7", "out of range", "0..1")),
    Entry("head-out-of-range", "Components", "A head the model does not have",
          "hp.ablate(m, task, 'L0H5')", "ComponentError", ("head 5", "out of range", "0..1")),
    Entry("foreign-component", "Components", "A component made for another model",
          "hp.ablate(m, task, other.components('heads')[0])", "ComponentError",
          ("made for a model with 3 layers x 4 heads", "2 layers x 2 heads", "model.components"),
          setup="other = tiny.model('gpt2', layers=3, heads=4, d=32)"),
    Entry("empty-components", "Components", "An empty component list",
          "hp.ablate(m, task, [])", "ComponentError", ("empty", "'all'")),
    Entry("not-a-component", "Components", "Something that is not a component or selector",
          "hp.ablate(m, task, 3)", "ComponentError", ("cannot read components", "selector")),
    Entry("residual-ablated", "Components", "The residual stream where only writers make sense",
          "hp.self_repair(m, task, 'RESID1')", "ComponentError", ("RESID1", "residual stream", "activation_patch")),
    Entry("bad-pair", "Components", "A paired ablation given a single name instead of a pair",
          "hp.paired_ablation(m, task, ['L0H0'])", "ComponentError", ("two components",)),
    Entry("overlapping-pair", "Components", "A pair whose two sides share a component",
          "hp.paired_ablation(m, task, [('L0H0', 'L0H0+L1H1')])", "ComponentError", ("overlaps", "distinct")),
    Entry("duplicate-components", "Components", "A component named twice (its prompts would count twice)",
          "hp.self_repair(m, task, ['L1H1', 'L0H0', 'L1H1'])", "ComponentError",
          ("L1H1", "more than once", "once")),
    Entry("duplicate-via-selector", "Components", "A selector and a name it already covers",
          "hp.ablate(m, task, ['heads', 'L0H1'])", "ComponentError", ("L0H1", "more than once")),
    Entry("duplicate-pair", "Components", "The same pair twice",
          "hp.paired_ablation(m, task, [('L0H0', 'L1H1'), ('L0H0', 'L1H1')])", "ComponentError",
          ("(L0H0, L1H1)", "more than once")),
    Entry("layer-with-its-head", "Components", "A whole attention layer paired with one of its own heads",
          "hp.paired_ablation(m, task, [('ATTN1', 'L1H0')])", "ComponentError",
          ("overlaps", "ATTN1 contains L1H0")),
    Entry("overlapping-group", "Components", "A joint group holding a layer and one of its heads",
          "hp.ablate(m, task, ['ATTN1+L1H1'])", "ComponentError", ("ATTN1+L1H1", "ATTN1 contains L1H1", "twice")),
    Entry("overlapping-sender-group", "Components", "A path-patching sender group that counts a head twice",
          "hp.path_patch(m, task, ['ATTN0+L0H1'], 'logits')", "ComponentError", ("ATTN0 contains L0H1",)),
    Entry("overlapping-compensator", "Components", "An iterated-ablation compensator inside the target",
          "hp.iterated_ablation(m, task, 'ATTN1', ['L1H0'])", "ComponentError",
          ("compensator L1H0 overlaps the target", "ATTN1 contains L1H0")),
    Entry("selector-in-pair", "Components", "A selector where a pair needs one component",
          "hp.paired_ablation(m, task, [('heads', 'L1H0')])", "ComponentError",
          ("'heads' is a selector", "each side of a pair")),
    Entry("non-string-compensator", "Components", "A compensator that is not a component name",
          "hp.iterated_ablation(m, task, 'L0H0', [3])", "ComponentError", ("int", "3", "'L3H5'")),
    # ------------------------------------------------------------------ models
    Entry("unsupported-architecture", "Models", "An architecture without a table",
          "hp.load_model(tf.OPTForCausalLM(tf.OPTConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=16,\n"
          "    ffn_dim=32, word_embed_proj_dim=16, vocab_size=50)), tokenizer=tiny.tokenizer())",
          "ArchitectureError", ("'opt' is not supported", "gpt2", "register_table")),
    Entry("vision-language", "Models", "A vision-language object (Gemma-3): its text model is what can be analysed",
          "vc = tf.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
          "    num_attention_heads=2, image_size=16, patch_size=8)\n"
          "tc = tf.Gemma3TextConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
          "    num_attention_heads=2, num_key_value_heads=1, head_dim=8)\n"
          "hp.load_model(tf.Gemma3ForConditionalGeneration(tf.Gemma3Config(text_config=tc.to_dict(),\n"
          "    vision_config=vc.to_dict(), mm_tokens_per_image=4)), tokenizer=tiny.tokenizer())",
          "ArchitectureError", ("vision-language", "gemma3_text", "Gemma3ForCausalLM")),
    Entry("gguf-missing", "Models", "A GGUF path that does not exist",
          "hp.load_model('weights/model.gguf', tokenizer=tiny.tokenizer())",
          "InputError", ("GGUF file", "does not exist")),
    Entry("not-causal", "Models", "A model that is not a causal LM (masked LM, base model, classifier)",
          "hp.load_model(tf.BertForMaskedLM(tf.BertConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=16,\n"
          "    intermediate_size=32, vocab_size=50)), tokenizer=tiny.tokenizer())",
          "ArchitectureError", ("BertForMaskedLM", "not a causal LM", "AutoModelForCausalLM")),
    Entry("no-lm-head", "Models", "A base model without its next-token head",
          "hp.load_model(tf.GPT2Model(tf.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50)),\n"
          "    tokenizer=tiny.tokenizer())",
          "ArchitectureError", ("GPT2Model", "not a causal LM", "GPT2LMHeadModel")),
    Entry("encoder-decoder", "Models", "An encoder-decoder model",
          "hp.load_model(tf.T5ForConditionalGeneration(tf.T5Config(num_layers=1, num_heads=2, d_model=16, d_kv=8,\n"
          "    d_ff=32, vocab_size=50)), tokenizer=tiny.tokenizer())",
          "ArchitectureError", ("encoder-decoder", "causal LM")),
    Entry("no-tokenizer", "Models", "A model object without its tokenizer",
          "hp.load_model(tiny.hf_model('gpt2', layers=1))", "InputError", ("tokenizer", "AutoTokenizer")),
    Entry("pickle-weights", "Models", "A folder holding only pickled weights (pytorch_model.bin)",
          "hp.load_model('legacy_model')", "InputError", ("no .safetensors", "safe_serialization=True"),
          setup="hf = tiny.hf_model('gpt2', layers=1); hf.config.save_pretrained('legacy_model')\n"
                "torch.save(hf.state_dict(), 'legacy_model/pytorch_model.bin')"),
    Entry("missing-folder", "Models", "A model folder that does not exist",
          "hp.load_model('./models/my-gpt2')", "InputError", ("does not exist", "save_pretrained")),
    Entry("not-a-model", "Models", "Something that is not a model",
          "hp.load_model(3)", "InputError", ("cannot load a model from a int",)),
    Entry("missing-device", "Models", "A device that does not exist here",
          "hp.load_model(tiny.hf_model('gpt2', layers=1), tokenizer=tiny.tokenizer(), device='cuda:99')",
          "OptionError", ("'cuda:99'", "cpu"), portable=False),
    Entry("not-a-device", "Models", "A device name torch does not know",
          "hp.load_model(tiny.hf_model('gpt2', layers=1), tokenizer=tiny.tokenizer(), device='gpu')",
          "OptionError", ("'gpu'", "not a torch device", "cuda:0")),
    Entry("unknown-dtype", "Models", "A dtype name that is not one of the supported ones",
          "hp.load_model('default', dtype='fp8')", "OptionError", ("unknown dtype", "bfloat16", "auto")),
    Entry("unknown-backend", "Models", "An unknown backend",
          "hp.load_model(tiny.hf_model('gpt2', layers=1), tokenizer=tiny.tokenizer(), backend='remote')",
          "OptionError", ("unknown backend", "nnsight")),
    Entry("remote-without-nnsight", "Models", "Remote execution without the nnsight backend",
          "hp.load_model('default', remote=True)", "OptionError", ("remote", "backend='nnsight'")),
    Entry("remote-host-not-url", "Models", "An NDIF host that is not a URL",
          "hp.load_model('default', backend='nnsight', remote='api.ndif.us')",
          "OptionError", ("'api.ndif.us'", "not a URL", "NDIF_HOST")),
    Entry("offload-folder-unwritable", "Models", "An offload folder that cannot be written",
          "hp.load_model('default', device_map={'transformer': 'cpu', 'lm_head': 'disk'},\n"
          "              offload_folder='/proc/hydra_probe_offload')",
          "OptionError", ("offload_folder", "cannot be written")),
    Entry("device-map-missing-device", "Models", "A device_map that names a device that does not exist here",
          "hp.load_model('default', device_map={'transformer': 'cuda:7', 'lm_head': 'cpu'})",
          "OptionError", ("'transformer'", "'cuda:7'"), portable=False),
    # ------------------------------------------------------------------ tasks
    Entry("unequal-lengths", "Tasks", "Clean and corrupted prompts of different token lengths",
          "hp.tasks.from_pairs(m, [{'clean': 'When Mary and John went to the store , John gave a drink to',\n"
          "    'corrupted': 'When Mary and John went to the store , Anna gave a book and a drink to',\n"
          "    'answer': ' Mary', 'alternative': ' John'}])",
          "TaskError", ("row 1", "different token lengths", "same length")),
    Entry("multi-token-answer", "Tasks", "An answer of several tokens",
          "hp.tasks.from_pairs(m, [{'clean': 'When Mary and John went to the store , John gave a drink to',\n"
          "    'corrupted': 'When Mary and John went to the store , Anna gave a drink to',\n"
          "    'answer': ' Mary Anna', 'alternative': ' John'}])",
          "TaskError", ("row 1", "2 tokens", "single tokens")),
    Entry("answer-not-in-vocabulary", "Tasks", "An answer that is not in the vocabulary",
          "hp.tasks.from_pairs(m, [{'clean': 'When Mary and John went to the store , John gave a drink to',\n"
          "    'corrupted': 'When Mary and John went to the store , Anna gave a drink to',\n"
          "    'answer': ' Zyxwv', 'alternative': ' John'}])",
          "TaskError", ("row 1", "not in the vocabulary")),
    Entry("answer-equals-alternative", "Tasks", "The same token as answer and alternative",
          "hp.tasks.from_pairs(m, [{'clean': 'When Mary and John went to the store , John gave a drink to',\n"
          "    'corrupted': 'When Mary and John went to the store , Anna gave a drink to',\n"
          "    'answer': ' Mary', 'alternative': ' Mary'}])",
          "TaskError", ("row 1", "same token")),
    Entry("missing-field", "Tasks", "A row without one of the four fields",
          "hp.tasks.from_pairs(m, [{'clean': 'When Mary and John went to the store , John gave a drink to',\n"
          "    'answer': ' Mary', 'alternative': ' John'}])",
          "TaskError", ("row 1", "corrupted")),
    Entry("empty-rows", "Tasks", "An empty list of rows",
          "hp.tasks.from_pairs(m, [])", "TaskError", ("empty", "at least one row")),
    Entry("empty-task", "Tasks", "An empty task passed to an analysis",
          "hp.ablate(m, task.subset([]), 'heads')", "TaskError", ("empty", "at least one prompt pair")),
    Entry("zero-prompts", "Tasks", "Zero prompts asked for",
          "hp.tasks.ioi(m, n_prompts=0)", "TaskError", ("n_prompts", "positive", "at least one")),
    Entry("unknown-corruption", "Tasks", "An unknown IOI corruption",
          "hp.tasks.ioi(m, 8, corruption='shuffle')", "OptionError", ("'shuffle'", "swap", "abc")),
    Entry("foreign-task", "Tasks", "A task tokenized for a model with a larger vocabulary",
          "hp.ablate(small, task, 'L0H0')", "TaskError", ("beyond this model's vocabulary", "another model"),
          setup="small = hp.load_model(tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_head=2, n_embd=16,\n"
                "    vocab_size=20)), tokenizer=tiny.tokenizer())"),
    Entry("not-a-task", "Tasks", "Rows passed where a Task is expected",
          "hp.ablate(m, [{'clean': 'a', 'corrupted': 'b', 'answer': ' c', 'alternative': ' d'}], 'heads')",
          "TaskError", ("expected a hydra_probe Task", "from_pairs")),
    Entry("jsonl-malformed-line", "Tasks", "A JSONL task file with a malformed line",
          "hp.tasks.from_jsonl(m, 'task.jsonl')", "TaskError", ("task.jsonl:2", "malformed JSON"),
          setup="Path('task.jsonl').write_text(json.dumps(task.pairs[0]) + '\\n' + '{\"clean\": \"When Mary\",\\n')"),
    Entry("jsonl-missing-field", "Tasks", "A JSONL line without a field",
          "hp.tasks.from_jsonl(m, 'task.jsonl')", "TaskError", ("task.jsonl:3", "answer"),
          setup="rows = [dict(p) for p in task.pairs[:3]]; del rows[2]['answer']\n"
                "Path('task.jsonl').write_text(''.join(json.dumps(r) + '\\n' for r in rows))"),
    Entry("jsonl-missing-file", "Tasks", "A task file that does not exist",
          "hp.tasks.from_jsonl(m, 'tasks/ioi.jsonl')", "TaskError", ("does not exist", "JSONL")),
    Entry("resample-lone-length", "Tasks", "Resample ablation with a prompt length that has no donor",
          "hp.ablate(m, task.subset([0, 1]), 'heads', value='resample')", "TaskError",
          ("resample", "single prompt", "value='mean'")),
    Entry("degenerate-mean", "Tasks", "A mean over one prompt (it replaces the activation by itself)",
          "hp.self_repair(m, task.subset([0]), 'heads', value='mean')", "TaskError",
          ("degenerate", "only one prompt", "value='zero'")),
    Entry("degenerate-mean-positions", "Tasks", "A mean at positions only one prompt reaches",
          "hp.ablate(m, task.subset([0, 1, 2]), 'heads', positions=[0, -1])", "TaskError",
          ("degenerate at position(s) 18", "only one prompt")),
    Entry("foreign-tokenizer", "Tasks", "A task built with another tokenizer whose ids happen to fit",
          "hp.ablate(other, task, 'L0H0')", "TaskError", ("another tokenizer", "from_pairs(model, task.pairs)"),
          setup="other = hp.load_model(tiny.hf_model('gpt2', layers=2, heads=2, d=16), tokenizer=tiny.tokenizer(bos=True))"),
    Entry("prompt-beyond-context", "Tasks", "A prompt longer than the model's context",
          "hp.ablate(m, long, 'L0H0')", "TaskError", ("70 tokens", "context of 64"),
          setup="words = ' '.join(f'w{i % 60}' for i in range(69))\n"
                "long = hp.tasks.from_pairs(m, [{'clean': words + ' Mary', 'corrupted': words + ' John',\n"
                "    'answer': ' Mary', 'alternative': ' John'}] * 2)"),
    Entry("jsonl-not-utf8", "Tasks", "A task file that is not UTF-8 text",
          "hp.tasks.from_jsonl(m, 'task.jsonl')", "TaskError", ("task.jsonl:2", "not UTF-8"),
          setup="Path('task.jsonl').write_bytes(json.dumps(task.pairs[0]).encode() + b'\\n' + 'café'.encode('latin-1'))"),
    Entry("short-reference", "Tasks", "A mean-ablation reference shorter than the task's prompts",
          "hp.ablate(m, task, 'heads', value=task.subset([0]))", "TaskError",
          ("reference", "at most", "at least as long")),
    # ------------------------------------------------------------------ options
    Entry("unknown-value", "Options", "An unknown ablation value",
          "hp.ablate(m, task, 'heads', value='median')", "OptionError", ("'median'", "zero, mean, resample")),
    Entry("unknown-metric", "Options", "An unknown metric",
          "hp.ablate(m, task, 'heads', metric='accuracy')", "MetricError", ("'accuracy'", "logit_diff", "callable")),
    Entry("unknown-scale", "Options", "An unknown norm-scale policy",
          "hp.self_repair(m, task, 'heads', scale='fixed')", "OptionError", ("'fixed'", "frozen", "recomputed")),
    Entry("unknown-direction", "Options", "An unknown patch direction",
          "hp.activation_patch(m, task, 'heads', direction='forward')", "OptionError",
          ("'forward'", "denoise", "noise")),
    Entry("unknown-run", "Options", "Direct effects of an unknown run",
          "hp.direct_effects(m, task, run='patched')", "OptionError", ("'patched'", "clean", "corrupted")),
    Entry("bad-positions", "Options", "Positions that are not positions",
          "hp.ablate(m, task, 'heads', positions='first')", "OptionError", ("positions", "'last'")),
    Entry("positions-out-of-range", "Options", "A position beyond the shortest prompt",
          "hp.ablate(m, task, 'heads', positions=40)", "OptionError", ("40", "15 tokens", "0..14")),
    Entry("empty-positions", "Options", "An empty list of positions (the intervention would do nothing)",
          "hp.ablate(m, task, 'heads', positions=[])", "OptionError", ("positions=[]", "at least one position")),
    Entry("non-integer-positions", "Options", "Positions that are not integers",
          "hp.self_repair(m, task, 'heads', positions=[1.5, 2])", "OptionError", ("1.5", "not an int")),
    Entry("seed-too-large", "Options", "A seed the random generators cannot take",
          "hp.ablate(m, task, 'heads', value='resample', seed=2**70)", "OptionError", ("seed", "0..4294967295")),
    Entry("report-top-k-zero", "Options", "A report option that would fail after the expensive steps",
          "hp.triangulate(m, task, graph_top_k=0)", "OptionError", ("graph_top_k", ">= 1")),
    Entry("report-exact-unknown", "Options", "An unknown choice of exact sweeps for the report",
          "hp.triangulate(m, task, exact='some')", "OptionError", ("exact", "'auto'", "'all'")),
    Entry("bad-seed", "Options", "A seed that is not an integer",
          "hp.ablate(m, task, 'heads', value='resample', seed='one')", "OptionError", ("seed", "integer")),
    Entry("nonlinear-metric-decomposition", "Options", "A non-linear metric where direct effects are needed",
          "hp.self_repair(m, task, 'heads', metric='prob')", "MetricError", ("linear", "'prob'", "logit_diff")),
    Entry("custom-metric-not-linear", "Options", "A custom metric declared linear that is not",
          "hp.direct_effects(m, task, metric=hp.Metric('soft', True, soft))", "MetricError",
          ("'soft'", "not linear", "w . logits + c"),
          setup="def soft(logits, answer, alternative):\n"
                "    return torch.softmax(logits, -1).gather(1, answer[:, None]).squeeze(1)"),
    # ------------------------------------------------------------------ model state
    Entry("foreign-hook", "Model state", "A hook left on the final norm (it changes the output, not the "
          "decomposition)", "hp.self_repair(hooked, task, 'heads')", "ForeignHookError",
          ("transformer.ln_f", "forward hook", "remove them"),
          setup="hooked = tiny.model('gpt2', layers=2, heads=2, d=16)\n"
                "def shift(module, args, output):\n    return output + 1\n"
                "handle = hooked.hf_model.transformer.ln_f.register_forward_hook(shift)"),
    Entry("busy-model", "Model state", "A model busy with an analysis in another thread",
          "hp.ablate(busy, busy_task, 'L0H1')", "ConcurrencyError", ("busy", "another thread", "its own model"),
          setup="import threading\nbusy = tiny.model('gpt2', layers=2, heads=2, d=16); busy_task = tiny.ioi(busy, 4)\n"
                "started = threading.Event()\n"
                "def slow(logits, answer, alternative):  # holds the model until the process ends\n"
                "    started.set(); threading.Event().wait(60); raise SystemExit\n"
                "threading.Thread(target=hp.ablate, args=(busy, busy_task, 'L0H0'), kwargs={'metric': slow},\n"
                "                 name='worker', daemon=True).start(); started.wait(60)"),
    # ------------------------------------------------------------------ numbers
    Entry("metric-wrong-shape", "Numbers and metrics", "A metric callable returning the wrong shape",
          "hp.ablate(m, task, 'heads', metric=two_numbers)", "MetricError",
          ("two_numbers", "(2, 2)", "one number per prompt", "(2,)"),
          setup="def two_numbers(logits, answer, alternative):\n    return logits[:, :2]",
          before_work=False),
    Entry("metric-nan", "Numbers and metrics", "A metric callable returning NaN",
          "hp.ablate(m, task, 'heads', metric=log_of_negative)", "NumericalError",
          ("log_of_negative", "NaN or infinite", "metric function"),
          setup="def log_of_negative(logits, answer, alternative):\n"
                "    return torch.log(-logits.gather(1, answer[:, None]).squeeze(1).abs() - 1)",
          before_work=False),
    Entry("nan-weights", "Numbers and metrics", "A model whose weights contain NaN",
          "hp.ablate(bad, task, 'heads')", "NumericalError", ("NaN or infinite activations", "float32"),
          setup="bad = tiny.model('gpt2', layers=2, heads=2, d=16)\n"
                "with torch.no_grad():\n    bad.hf_model.transformer.h[0].mlp.c_fc.weight[0, 0] = float('nan')",
          before_work=False),
    Entry("inf-weights", "Numbers and metrics", "A model whose weights contain an infinity",
          "hp.direct_effects(bad, task)", "NumericalError", ("NaN or infinite activations",),
          setup="bad = tiny.model('gpt2', layers=2, heads=2, d=16)\n"
                "with torch.no_grad():\n    bad.hf_model.transformer.wte.weight[5:, 0] = float('inf')",
          before_work=False),
    Entry("equal-metrics", "Numbers and metrics", "A task whose clean and corrupted metrics are equal",
          "hp.activation_patch(m, same, 'heads')", "MetricError", ("equal", "undefined", "corruption"),
          setup="same = hp.tasks.from_pairs(m, [dict(p, corrupted=p['clean']) for p in task.pairs])",
          before_work=False),
    Entry("out-of-memory", "Numbers and metrics", "A batch too large for memory even one copy at a time",
          "hp.ablate(tight, task, 'heads')", "ResourceError", ("does not fit in memory", "--n-prompts", "smaller dtype"),
          setup="tight = tiny.model('gpt2', layers=2, heads=2, d=16)\n"
                "def no_memory(*args, **kwargs):\n"
                "    raise torch.OutOfMemoryError('CUDA out of memory (simulated)')\n"
                "tight.adapter.run_blocks = no_memory  # simulate a device that is too small",
          before_work=False),
    # ------------------------------------------------------------------ results
    Entry("unreadable-result", "Results", "Loading a saved result from a file that is not one",
          "hp.load_result('notes.json')", "InputError", ("cannot read a saved result", "notes.json"),
          setup="Path('notes.json').write_text('not json')"),
    # ------------------------------------------------------------------ mechanisms of self-repair
    Entry("mlp-not-downstream", "Mechanisms", "Neurons of an MLP that does not read the ablated component",
          "hp.neuron_contributions(m, task, 'L1H0', 'MLP0')", "ComponentError",
          ("MLP0 is not downstream of L1H0", "later layer")),
    Entry("neurons-of-attention-layer", "Mechanisms", "Neuron contributions for a component that is not a head or MLP",
          "hp.neuron_contributions(m, task, 'ATTN0', 'MLP1')", "ComponentError", ("ATTN0", "not a head or an MLP")),
    Entry("no-neuron-basis", "Mechanisms", "Neurons of a model whose table names no MLP output projection",
          "hp.neuron_contributions(nb, task, 'L0H0', 'MLP1')", "ArchitectureError", ("no neuron basis", "mlp_out_proj"),
          setup="import dataclasses\nnb = tiny.model('gpt2', layers=2, heads=2, d=16)\n"
                "nb.adapter.table = dataclasses.replace(nb.adapter.table, mlp_out_proj=None)"),
    Entry("unknown-split-order", "Mechanisms", "An unknown split order of the mechanisms",
          "hp.repair_mechanisms(m, task, 'heads', order='both')", "OptionError",
          ("'both'", "pattern_first", "symmetric")),
    # ------------------------------------------------------------------ natural text and tasks
    Entry("text-empty", "Natural text and tasks", "Text mode given no texts",
          "hp.text_self_repair(m, [])", "TaskError", ("text list is empty",)),
    Entry("text-one-token", "Natural text and tasks", "A text of one token (nothing to predict)",
          "hp.text_self_repair(m, ['Mary went home', 'Mary'], value='zero')", "TaskError",
          ("text 1", "1 token(s)", "at least 2 tokens")),
    Entry("text-undecodable", "Natural text and tasks", "A texts file with bytes that are not UTF-8",
          "hp.read_texts('texts.txt')", "TaskError", ("texts.txt:2", "not valid UTF-8", "column 1"),
          setup="Path('texts.txt').write_bytes(b'Mary went home\\n\\xff oops\\n')"),
    Entry("text-top-fraction", "Natural text and tasks", "A top fraction outside (0, 1]",
          "hp.text_self_repair(m, ['Mary went home', 'John went home'], top_fraction=0)", "OptionError",
          ("top_fraction", "(0, 1]")),
    Entry("text-too-long", "Natural text and tasks", "A text longer than the model's context",
          "hp.text_self_repair(m, [' '.join(['Mary'] * 80), 'John went home'])", "TaskError",
          ("80 tokens", "context of 64", "window=64")),
    Entry("pronoun-vocabulary", "Natural text and tasks", "The pronoun task on a vocabulary without ' he' / ' she'",
          "hp.tasks.pronoun(m, 8)", "TaskError", ("' she'", "single known token")),
    Entry("greater-than-tokenizer", "Natural text and tasks",
          "Greater-than on a tokenizer without two-digit year tokens",
          "hp.tasks.greater_than(m, 8)", "TaskError", ("century token", "two-digit")),
    # ------------------------------------------------------------------ conditions (compare_conditions)
    Entry("conditions-unknown-corruption", "Conditions", "An unknown corruption in the list of conditions",
          "hp.compare_conditions(m, task, corruptions=('abc', 'shuffle'))", "OptionError",
          ("unknown corruption 'shuffle'", "swap, abc")),
    Entry("conditions-corruption-not-makeable", "Conditions", "A corruption the task cannot make (its own only)",
          "hp.compare_conditions(m, own)", "TaskError",
          ("cannot make the corruption 'swap', 'abc'", "only 'custom'", "corruptions=('custom',)"),
          setup="own = hp.tasks.from_pairs(m, task.pairs)"),
    Entry("conditions-empty-list", "Conditions", "An empty list of ablation values",
          "hp.compare_conditions(m, task, values=[])", "OptionError", ("ablation values is empty", "at least one")),
    Entry("conditions-unknown-value", "Conditions", "An unknown ablation value in the list",
          "hp.compare_conditions(m, task, values=('mean', 'median'))", "OptionError",
          ("unknown ablation value 'median'", "zero, mean, resample")),
]

CLI_ENTRIES: list[CliEntry] = [
    CliEntry("cli-zero-prompts", "`--n-prompts 0`", ("ablate", "--n-prompts", "0", "--out", "result"),
             ("--n-prompts", "positive integer"), out="result"),
    CliEntry("cli-missing-device", "A device that does not exist here",
             ("report", "--device", "cuda:99"), ("'cuda:99'", "cpu"), out="hydra_report", portable=False),
    CliEntry("cli-not-a-device", "A device name torch does not know",
             ("ablate", "--device", "gpu", "--out", "result"), ("'gpu'", "not a torch device"), out="result"),
    CliEntry("cli-unknown-value", "An unknown ablation value", ("ablate", "--value", "median"),
             ("--value", "'median'", "zero")),
    CliEntry("cli-unknown-component", "An unknown component",
             ("ablate", "--components", "L0H0,L99H0", "--out", "result"), ("'L99H0'", "out of range"), out="result"),
    CliEntry("cli-jsonl-line", "A malformed line in a JSONL task file",
             ("report", "--task", "pairs.jsonl"), ("pairs.jsonl:2", "malformed JSON"), out="hydra_report",
             setup="Path('pairs.jsonl').write_text(json.dumps({'clean': 'When Mary and John went to the store , "
                   "John gave a drink to', 'corrupted': 'When Mary and John went to the store , Anna gave a drink to', "
                   "'answer': ' Mary', 'alternative': ' John'}) + '\\n{\"clean\": \"When Mary\",\\n')"),
    CliEntry("cli-non-empty-out", "An output folder that exists and is not empty, without `--overwrite`",
             ("report", "--out", "existing"), ("'existing'", "not empty", "--overwrite"), out="existing",
             setup="Path('existing').mkdir(); Path('existing/notes.txt').write_text('keep me')"),
    CliEntry("cli-out-under-a-file", "An output folder whose parent is a file",
             ("report", "--out", "notes.txt/report"), ("notes.txt", "is a file"), out="notes.txt",
             setup="Path('notes.txt').write_text('keep me')"),
    CliEntry("cli-out-is-a-file", "An output folder that is an existing file",
             ("ablate", "--out", "notes.txt"), ("'notes.txt'", "existing file"), out="notes.txt",
             setup="Path('notes.txt').write_text('keep me')"),
    CliEntry("cli-out-dot", "An output name that is not a folder name",
             ("graph", "--out", "."), ("'.'", "does not name a folder")),
    CliEntry("cli-conditions-unknown", "A name in `--conditions` that is no corruption, value or metric",
             ("conditions", "--conditions", "abc,median"), ("'median'", "neither a corruption"),
             out="hydra_conditions"),
    CliEntry("cli-duplicate-components", "A component named twice",
             ("ablate", "--components", "L1H1,L1H1,L1H1"), ("L1H1", "more than once")),
    CliEntry("cli-nan-model", "A model whose weights contain NaN",
             ("report", "--model", "nan_model", "--n-prompts", "4"), ("NaN or infinite",), out="hydra_report",
             setup="hf = tiny.hf_model('gpt2', layers=2, heads=2, d=16)\n"
                   "with torch.no_grad():\n    hf.transformer.h[0].mlp.c_fc.weight[0, 0] = float('nan')\n"
                   "hf.save_pretrained('nan_model'); tiny.tokenizer().save_pretrained('nan_model')"),
]


def namespace() -> dict[str, Any]:
    """The names every entry's code may use."""
    import json

    import tiny
    import torch
    import transformers as tf

    import hydra_probe as hp

    ns: dict[str, Any] = {"hp": hp, "tiny": tiny, "tf": tf, "torch": torch, "json": json, "Path": Path}
    exec(TINY, ns)
    return ns


@contextlib.contextmanager
def quiet() -> Any:
    """Silence transformers' config warnings while entries build their tiny models."""
    import logging
    import warnings

    from transformers.utils import logging as tlog

    lg = logging.getLogger("transformers")
    old, bars = lg.level, tlog.is_progress_bar_enabled()
    lg.setLevel(logging.ERROR)
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        lg.setLevel(old)
        if bars:
            tlog.enable_progress_bar()


def trigger(entry: Entry, ns: dict[str, Any]) -> BaseException | None:
    """Run ``entry`` in ``ns`` (in the current folder); the exception it raised, or None."""
    with quiet():
        exec(entry.setup, ns)
        try:
            exec(entry.code, ns)
        except Exception as e:  # noqa: BLE001 - we report whatever was raised
            return e
    return None


def cli_available() -> bool:
    try:
        import hydra_probe.cli  # noqa: F401
    except ImportError:
        return False
    return True


def save_tiny_model(folder: Path) -> None:
    """The tiny GPT-2 the command-line entries use, as a model folder (safetensors and tokenizer)."""
    import tiny

    with quiet():
        tiny.hf_model("gpt2", layers=2, heads=2, d=16).save_pretrained(folder)
        tiny.tokenizer().save_pretrained(folder)


def cli_argv(entry: CliEntry) -> list[str]:
    return list(entry.args) + ([] if "--model" in entry.args else ["--model", "tiny"])


def run_cli(entry: CliEntry, folder: Path, model_dir: Path | None = None) -> RunResult:
    """Run ``hydra-probe`` in-process in ``folder``: exit code, stdout, stderr, files before and after.

    ``folder/tiny`` is linked to (or saved as) the tiny model; ``setup`` runs there first.
    """
    import io

    from hydra_probe import cli

    if not (folder / "tiny").exists():
        if model_dir is not None:
            (folder / "tiny").symlink_to(model_dir, target_is_directory=True)
        else:
            save_tiny_model(folder / "tiny")
    cwd = os.getcwd()
    os.chdir(folder)
    out, err = io.StringIO(), io.StringIO()
    try:
        ns = namespace_light()
        with quiet():
            exec(entry.setup, ns)
        before = files_under(folder)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(cli_argv(entry))
    finally:
        os.chdir(cwd)
    return RunResult(code, out.getvalue(), err.getvalue(), before, files_under(folder))


@dataclass
class RunResult:
    code: int
    stdout: str
    stderr: str
    files_before: dict[str, bytes]
    files_after: dict[str, bytes]


def files_under(folder: Path) -> dict[str, bytes]:
    """Every path under ``folder`` (not following the ``tiny`` link) with its bytes (b'' for folders)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if rel.parts[0] == "tiny":
            continue
        out[str(rel)] = p.read_bytes() if p.is_file() else b""
    return out


def namespace_light() -> dict[str, Any]:
    import json

    import tiny
    import torch

    return {"tiny": tiny, "torch": torch, "json": json, "Path": Path}


def markdown() -> str:
    """The docs/errors.md page."""
    out = [
        "# Error catalogue",
        "",
        "<!-- generated by `python analyses/error_catalogue.py > docs/errors.md`; do not edit by hand -->",
        "",
        "Every bad input is refused with an exception from one family, `hydra_probe.HydraProbeError`, whose",
        "message says what was wrong and how to fix it. The classes (all importable from `hydra_probe`):",
        "",
        "| class | bases | meaning |",
        "|---|---|---|",
    ]
    import hydra_probe.errors as E

    for name in E.__all__:
        cls = getattr(E, name)
        bases = ", ".join(b.__name__ for b in cls.__bases__)
        out.append(f"| `{name}` | {bases} | {(cls.__doc__ or '').strip().splitlines()[0]} |")
    out += [
        "",
        "Every `InputError` is the caller's to fix; the command line prints its message on one line (no",
        "traceback) and exits with code 2. Errors marked *before any work* are raised before the first",
        "forward pass; the others need the model's numbers (a baseline run) to be detected. No error leaves",
        "an output file, and the model is left as it was (no hook, same flags and weights).",
        "",
        "Every public analysis call checks its arguments at entry (`hydra_probe/checks.py`), before any",
        "forward pass. Choices worth knowing:",
        "",
        "- **Duplicates are refused**, not removed: a component, group, pair or compensator named twice would",
        "  add the same prompts again and narrow every interval. Separate ablations of overlapping components",
        "  (`['ATTN1', 'L1H5']`) are two claims and run; a *joint* group, pair or compensator list that holds a",
        "  layer together with one of its heads is refused with the overlap named. `(c, d)` and `(d, c)` are",
        "  distinct pairs (their interactions agree, their splits into edge and reverse do not).",
        "- **Means need two prompts**: `value='mean'` (or a reference task) is refused at any position that",
        "  fewer than two reference prompts reach, where the mean would be the prompt's own activation.",
        "- **Custom metrics**: a `Metric(name, True, fn)` is decomposed through its own readout (its gradient",
        "  with respect to the logits and its value at zero logits), after a check that it is linear.",
        "- **Hooks**: forward, pre- and backward hooks the package did not register, on the modules it reads",
        "  through, are refused with their names (mark a hook that only reads with",
        "  `hydra_probe.checks.read_only(fn)`). Global module hooks are not inspected.",
        "- **Threads**: one model runs one analysis at a time; a call from a second thread while another holds",
        "  the model raises `ConcurrencyError` at once (nothing waits); nested calls in one thread pass, and",
        "  separate models run in parallel.",
        "- **Tasks** record their tokenizer's fingerprint; a model with another tokenizer refuses them.",
        "",
        "Each entry below ran on a tiny random GPT-2 (2 layers, 2 heads) from `tests/tiny.py`, set up with",
        "",
        "```python",
        "import hydra_probe as hp, tiny, torch, transformers as tf",
        TINY.replace("; ", "\n"),
        "```",
        "",
        "and the message shown is the one it raised, word for word.",
        "",
    ]
    ns = namespace()
    section = None
    with tempfile.TemporaryDirectory() as d:
        cwd = os.getcwd()
        os.chdir(d)
        try:
            for e in ENTRIES:
                if e.section != section:
                    section = e.section
                    out += [f"## {section}", ""]
                err = trigger(e, ns)
                if err is None:
                    raise SystemExit(f"entry {e.key} raised nothing")
                code = (e.setup + "\n" if e.setup else "") + e.code
                when = "before any work" if e.before_work else "after the baseline run"
                out += [f"### {e.title}", "", f"<a id=\"{e.key}\"></a>`{type(err).__name__}` ({when})", "",
                        "```python", code, "```", "", "```text", f"{type(err).__name__}: {err}", "```", ""]
        finally:
            os.chdir(cwd)
    out += ["## Command line", ""]
    if not cli_available():
        out += ["(The command line is not installed in this tree yet.)", ""]
        return "\n".join(out)
    out += ["`hydra-probe` runs the same checks before any work and prints the message on one line to stderr",
            "(no traceback), with exit code 2 for bad input. Each command ran in a folder holding `tiny/`, the",
            "tiny GPT-2 above saved with `save_pretrained`.", ""]
    with tempfile.TemporaryDirectory() as d:
        save_tiny_model(Path(d) / "model")
        for e in CLI_ENTRIES:
            with tempfile.TemporaryDirectory() as w:
                r = run_cli(e, Path(w), Path(d) / "model")
                code, err = r.code, r.stderr
            setup = ["```python", e.setup, "```", ""] if e.setup else []
            out += [f"### {e.title}", "", f"<a id=\"{e.key}\"></a>", ""] + setup + [
                "```console", "$ hydra-probe " + " ".join(cli_argv(e)), err.strip(), "$ echo $?", str(code), "```",
                ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(textwrap.dedent(markdown()).rstrip() + "\n")
