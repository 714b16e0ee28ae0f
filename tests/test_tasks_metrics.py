import json

import pytest
import tiny
import torch

import hydra_probe as hp


def test_ioi_pairs_equal_lengths_both_orders():
    m = tiny.model("gpt2")
    for corruption in ("swap", "abc"):
        t = hp.tasks.ioi(m, n_prompts=12, corruption=corruption, seed=3)
        assert len(t) == 12
        for c, k in zip(t.clean_ids, t.corrupted_ids):
            assert len(c) == len(k)
        for p in t.pairs:
            io, s = p["answer"].strip(), p["alternative"].strip()
            assert p["clean"].count(s) == 2 and p["clean"].count(io) == 1
            if corruption == "swap":
                assert p["corrupted"].count(io) == 2
        first = [p["clean"].index(p["answer"].strip()) < p["clean"].index(p["alternative"].strip()) for p in t.pairs]
        assert any(first) and not all(first)   # ABBA and BABA
    assert hp.tasks.ioi(m, 8, seed=1).pairs == hp.tasks.ioi(m, 8, seed=1).pairs
    assert hp.tasks.ioi(m, 8, seed=1).pairs != hp.tasks.ioi(m, 8, seed=2).pairs


def test_bos_is_added_for_bos_tokenizers():
    m = tiny.model("llama")
    t = hp.tasks.ioi(m, 4)
    assert all(int(c[0]) == m.tokenizer.bos_token_id for c in t.clean_ids)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_dummy_prefix_tokenizer_reads_names_in_context(family):
    """Llama-2/Mistral SentencePiece tokenizers split " Mary" alone into ["▁", "▁Mary"]; inside a prompt the
    name is one token. IOI names and answers must be the in-prompt ids."""
    tok = tiny.sp_tokenizer()
    assert len(tok(" Mary", add_special_tokens=False)["input_ids"]) == 2      # the trap is really there
    m = hp.load_model(tiny.hf_model(family, vocab=len(tok.get_vocab())), tokenizer=tok)
    t = hp.tasks.ioi(m, n_prompts=8, corruption="abc", seed=0)
    for p, c, a, b in zip(t.pairs, t.clean_ids, t.answer_ids, t.alternative_ids):
        assert int(c[0]) == tok.bos_token_id
        ids = c.tolist()
        assert ids.count(int(a)) == 1 and ids.count(int(b)) == 2          # IO once, S twice, as written
        assert tok.decode([int(a)]).strip() == p["answer"].strip()
    de = hp.direct_effects(m, t, components="all")
    f = de.to_frame()
    total = f.groupby("prompt").direct_effect.sum().to_numpy() + de.constant.constant.to_numpy()
    assert abs(total - de.constant.metric.to_numpy()).max() < 1e-4
    j = hp.tasks.from_pairs(m, [{"clean": "Then, Mary and John went to the store. John gave a ring to",
                                 "corrupted": "Then, Mary and John went to the store. Mary gave a ring to",
                                 "answer": " Mary", "alternative": " John"}])
    assert int(j.answer_ids[0]) == tok.convert_tokens_to_ids("▁Mary")


def test_mixed_lengths_read_each_prompts_last_token():
    m = tiny.model("llama")
    t = hp.tasks.ioi(m, 16, seed=0)   # several templates of different lengths
    assert len(set(t.lengths)) > 1
    f = hp.ablate(m, t, ["L0H0"], value="zero").to_frame()
    for i in range(len(t)):
        with torch.no_grad():
            lg = m.hf_model(t.clean_ids[i][None]).logits[0, -1]
        assert abs(float(lg[t.answer_ids[i]] - lg[t.alternative_ids[i]]) - f.clean_metric[i]) < 1e-4


def test_jsonl_roundtrip_and_line_numbers(tmp_path):
    m = tiny.model("gpt2")
    t = hp.tasks.ioi(m, 4)
    p = tmp_path / "t.jsonl"
    t.to_jsonl(p)
    t2 = hp.tasks.from_jsonl(m, p)
    assert t2.pairs == t.pairs
    lines = p.read_text().splitlines()
    lines.insert(2, "{not json")
    p.write_text("\n".join(lines))
    with pytest.raises(hp.TaskError, match=r"t.jsonl:3"):
        hp.tasks.from_jsonl(m, p)


def test_bad_pairs_are_refused():
    m = tiny.model("gpt2")
    row = {"clean": "Then , Tom and Amy went", "corrupted": "Then , Tom and Amy went to", "answer": " Mary",
           "alternative": " John"}
    with pytest.raises(hp.TaskError, match="different token lengths"):
        hp.tasks.from_pairs(m, [row])
    with pytest.raises(hp.TaskError, match="2 tokens"):
        hp.tasks.from_pairs(m, [dict(row, corrupted=row["clean"], answer=" Mary John")])
    with pytest.raises(hp.TaskError, match="not in the vocabulary"):
        hp.tasks.from_pairs(m, [dict(row, corrupted=row["clean"], answer=" Zebedee")])
    with pytest.raises(hp.TaskError, match="empty"):
        hp.tasks.from_pairs(m, [])


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_induction_task_on_every_family(family):
    m = tiny.model(family)
    t = hp.tasks.induction(m, n_prompts=4, seq_len=5, seed=0)
    assert len(t) == 4 and len(set(t.lengths)) == 1
    assert hp.ablate(m, t, ["MLP0"], value="zero").to_frame().shape[0] == 4


def test_metrics_per_prompt_match_manual():
    """Every metric, on the clean run and on the run with L0H0 zero-ablated, against a plain forward (the ablated
    logits from a hook on the output projection's input); KL compares the ablated run with the clean one."""
    m = tiny.model("qwen2")
    t = hp.tasks.ioi(m, 6)
    o_proj = m.hf_model.model.layers[0].self_attn.o_proj  # test-only module path
    dh = m.head_dim

    def zero_head0(mod, args):
        z = args[0].clone()
        z[..., :dh] = 0
        return (z,)

    with torch.no_grad():
        logits = torch.stack([m.hf_model(c[None]).logits[0, -1] for c in t.clean_ids])
        h = o_proj.register_forward_pre_hook(zero_head0)
        try:
            ablated = torch.stack([m.hf_model(c[None]).logits[0, -1] for c in t.clean_ids])
        finally:
            h.remove()
    a, b = t.answer_ids, t.alternative_ids

    def manual(lg):
        lp = torch.log_softmax(lg, -1)
        p0 = torch.log_softmax(logits, -1)
        return {"logit_diff": lg[range(6), a] - lg[range(6), b], "logit": lg[range(6), a], "logprob": lp[range(6), a],
                "prob": lp[range(6), a].exp(), "cross_entropy": -lp[range(6), a],
                "kl": (p0.exp() * (p0 - lp)).sum(-1)}

    clean_ref, abl_ref = manual(logits), manual(ablated)
    assert abl_ref["kl"].min() > 1e-6  # a real reference: the ablation moves the distribution
    for name in clean_ref:
        f = hp.ablate(m, t, ["L0H0"], value="zero", metric=name).to_frame()
        assert abs(f.clean_metric.to_numpy() - clean_ref[name].numpy()).max() < 1e-4, name
        assert abs(f.ablated_metric.to_numpy() - abl_ref[name].numpy()).max() < 1e-4 * max(1, abl_ref[name].abs().max()), name
        assert f.shape[0] == 6
    custom = hp.ablate(m, t, ["L0H0"], metric=lambda lg, a, b: lg[:, 0]).to_frame()
    assert abs(custom.clean_metric.to_numpy() - logits[:, 0].numpy()).max() < 1e-4
    with pytest.raises(hp.MetricError, match="one number per prompt"):
        hp.ablate(m, t, ["L0H0"], metric=lambda lg, a, b: lg)
    with pytest.raises(hp.MetricError, match="linear"):
        hp.direct_effects(m, t, metric="logprob")


def test_result_save_load_roundtrip(tmp_path):
    m = tiny.model("gpt2")
    t = hp.tasks.ioi(m, 4)
    sr = hp.self_repair(m, t, ["L0H0", "MLP1"], value="resample", seed=3)
    p = sr.save(tmp_path / "sr.json")
    back = hp.SelfRepair.load(p)
    assert back.provenance == json.loads(json.dumps(sr.provenance))
    import pandas.testing as pdt

    pdt.assert_frame_equal(back.to_frame(), sr.to_frame(), check_dtype=False)
    pdt.assert_frame_equal(back.contributions(), sr.contributions(), check_dtype=False)
    for k in ("model", "task", "corruption", "value", "metric", "scale", "n", "seed", "version"):
        assert k in sr.provenance
    assert "pickle" not in p.read_text()[:20]
