"""One real GRPOTrainer step with perm-lite as the reward (tiny random policy, no downloads)."""

import math

import pytest

trl = pytest.importorskip("trl")
torch = pytest.importorskip("torch")
datasets = pytest.importorskip("datasets")

from perm_lite.integrations.trl import perm_reward, perspective_rewards  # noqa: E402

WORDS = "i feel sad alone tired angry that sounds hard tell me more what happened you are not sorry".split()


def tiny_policy(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return LlamaForCausalLM(config), tokenizer


def test_grpo_trainer_runs_a_step_with_perm_rewards(tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = tiny_policy(tmp_path)
    dataset = datasets.Dataset.from_dict(
        {
            "prompt": ["i feel sad", "i feel alone", "i feel tired", "i feel angry"],
            "query": ["I feel sad today.", "I feel alone.", "I feel tired of everything.", "I feel angry at work."],
            "persona": ["", "student", "", "nurse"],
            "scenario": ["", "", "exams", ""],
        }
    )
    seen = []
    combined = perm_reward(length_limit=4, length_coef=0.01)

    def recording(**kwargs):
        out = combined(**kwargs)
        seen.append((kwargs, out))
        return out

    recording.__name__ = "perm"
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        max_steps=1,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        bf16=False,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[recording, *perspective_rewards()],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    assert trainer.state.global_step == 1
    kwargs, rewards = seen[0]
    assert set(kwargs) >= {"prompts", "completions", "completion_ids", "query", "persona", "scenario"}
    assert len(rewards) == len(kwargs["completions"]) == 4
    columns = ("query", "persona", "scenario")
    for i, (completion, ids, reward) in enumerate(zip(kwargs["completions"], kwargs["completion_ids"], rewards)):
        if not completion.strip():
            assert reward is None  # an empty completion gets no reward, not a batch mean
            continue
        assert reward is not None and math.isfinite(reward)
        without_length = perm_reward(length_coef=0)(
            prompts=[kwargs["prompts"][i]], completions=[completion], **{c: [kwargs[c][i]] for c in columns}
        )[0]
        penalty = -0.01 * max(0, len(ids) - 4)  # counted in the policy's tokens
        assert reward == pytest.approx(without_length + penalty, abs=1e-5)
    logged = trainer.state.log_history[0]
    for name in ("perm", "perm_resonation", "perm_expression", "perm_reception", "perm_bystander"):
        assert f"rewards/{name}/mean" in logged
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
