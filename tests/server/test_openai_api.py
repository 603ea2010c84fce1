"""The OpenAI API through the official client, in-process, on the tiny chat model."""

from __future__ import annotations

from typing import Any

import openai
import pytest
import torch
from conftest import AppFactory
from fastapi.testclient import TestClient
from tiny_chat import TINY_CONTEXT, TINY_MODEL_NAME, chat_ids, plain_greedy

from safesteer.adapters.adapter import SafetyAdapter
from safesteer.adapters.loading import LoadedModel

USER = [{"role": "user", "content": "hello there"}]
GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 12}


def chat(client: openai.OpenAI, safety: dict[str, Any] | None = None, **kw: Any) -> Any:
    extra = {"safety": safety} if safety is not None else None
    args: dict[str, Any] = {"model": TINY_MODEL_NAME, "messages": USER, **GREEDY, **kw}
    return client.chat.completions.create(extra_body=extra, **args)


def test_models_lists_the_served_model_with_family_and_adapter(
    client: openai.OpenAI, strong_adapter: SafetyAdapter
) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [TINY_MODEL_NAME]
    card = models[0].model_dump()
    assert card["family"] == "llama-64x4"
    assert card["adapter"] == strong_adapter.id


def test_mode_off_equals_plain_greedy_generation(
    client: openai.OpenAI, loaded: LoadedModel
) -> None:
    ids = chat_ids(loaded.tokenizer, "hello there")
    response = chat(client, {"mode": "off"})
    assert response.choices[0].message.content == plain_greedy(loaded, ids, GREEDY["max_tokens"])
    report = response.model_dump()["safety"]
    assert report["mode"] == "off"
    assert set(report["categories"].values()) == {0.0}


def test_category_toggles_change_the_output_and_are_reported(
    client: openai.OpenAI, strong_adapter: SafetyAdapter
) -> None:
    default = chat(client)
    off = chat(client, {"mode": "off"})
    all_zero = chat(client, {"categories": dict.fromkeys(strong_adapter.categories, 0.0)})
    fraud_only = chat(client, {"categories": {"violence": 0, "fraud": 4}})
    assert default.choices[0].message.content != off.choices[0].message.content
    assert all_zero.choices[0].message.content == off.choices[0].message.content
    assert fraud_only.choices[0].message.content != default.choices[0].message.content
    report = fraud_only.model_dump()["safety"]
    assert report["adapter"] == strong_adapter.id
    assert report["sha256"] == strong_adapter.payload_sha256
    assert report["categories"] == {"violence": 0.0, "fraud": 4.0, "drugs": 0.0}


def test_strength_scales_the_default_mix(client: openai.OpenAI) -> None:
    assert chat(client, {"strength": 0}).choices[0].message.content == (
        chat(client, {"mode": "off"}).choices[0].message.content
    )


def test_stream_matches_non_stream_and_ends_with_usage(client: openai.OpenAI) -> None:
    whole = chat(client)
    stream = chat(client, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_raw_stream_ends_with_done(http: TestClient) -> None:
    body = {"messages": USER, "max_tokens": 3, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_completions_with_string_list_and_token_prompts(client: openai.OpenAI) -> None:
    single = client.completions.create(model=TINY_MODEL_NAME, prompt="abc", **GREEDY)
    assert single.usage is not None and single.usage.prompt_tokens == 3
    batch = client.completions.create(model=TINY_MODEL_NAME, prompt=["abc", "xyz"], **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == single.choices[0].text
    tokens = client.completions.create(model=TINY_MODEL_NAME, prompt=[66, 67, 68], **GREEDY)
    assert tokens.choices[0].text == single.choices[0].text
    streamed = client.completions.create(model=TINY_MODEL_NAME, prompt="abc", stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == single.choices[0].text


def test_completions_default_to_16_tokens(client: openai.OpenAI) -> None:
    response = client.completions.create(model=TINY_MODEL_NAME, prompt="abc", temperature=0)
    assert response.usage is not None and response.usage.completion_tokens <= 16


def test_n_choices_and_seeded_sampling(client: openai.OpenAI) -> None:
    greedy = chat(client, n=3)
    assert len({c.message.content for c in greedy.choices}) == 1
    sampled = [
        chat(client, n=2, temperature=1.0, seed=11).choices[i].message.content for i in (0, 1)
    ]
    again = [chat(client, n=2, temperature=1.0, seed=11).choices[i].message.content for i in (0, 1)]
    assert sampled == again
    assert [c.index for c in greedy.choices] == [0, 1, 2]


def test_stop_sequence_cuts_the_text(client: openai.OpenAI) -> None:
    full = chat(client, max_tokens=20).choices[0].message.content
    assert full and len(full) > 4
    stop = full[2:4]
    response = chat(client, max_tokens=20, stop=[stop])
    assert response.choices[0].message.content == full[: full.index(stop)]
    assert response.choices[0].finish_reason == "stop"
    streamed = chat(client, max_tokens=20, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == full[: full.index(stop)]


def test_length_finish_reason_and_usage(client: openai.OpenAI) -> None:
    response = chat(client, max_tokens=2, stop=None)
    if response.choices[0].finish_reason == "length":
        assert response.usage.completion_tokens == 2
    assert response.usage.total_tokens == (
        response.usage.prompt_tokens + response.usage.completion_tokens
    )


BAD_REQUESTS: list[tuple[dict[str, Any], str | None]] = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": USER, "temperature": 3}, "temperature"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "n": 99}, "n"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": USER, "logprobs": True}, "logprobs"),
    ({"messages": USER, "logit_bias": {"1": 5}}, "logit_bias"),
    ({"messages": USER, "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": USER, "presence_penalty": 1}, "presence_penalty"),
    ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": USER, "safety": {"categories": {"nope": 1}}}, "safety.categories.nope"),
    ({"messages": USER, "safety": {"categories": {"fraud": 9}}}, "safety"),
    ({"messages": USER, "safety": {"mode": "sometimes"}}, "safety.mode"),
    ({"messages": USER, "safety": {"strength": -1}}, "safety.strength"),
    ({"messages": USER, "safety": {"colour": "red"}}, "safety.colour"),
    ({"messages": USER, "safety": "on"}, "safety"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
]


@pytest.mark.parametrize(("body", "param"), BAD_REQUESTS)
def test_bad_requests_are_400_with_param_and_server_keeps_working(
    http: TestClient, client: openai.OpenAI, body: dict[str, Any], param: str | None
) -> None:
    response = http.post("/v1/chat/completions", json={"model": TINY_MODEL_NAME, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]
    assert chat(client, max_tokens=1).choices[0].message is not None


def test_sdk_raises_bad_request_for_unknown_category(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, {"categories": {"cooking": 1.0}})
    assert info.value.body["param"] == "safety.categories.cooking"  # type: ignore[index]


def test_context_length_exceeded(client: openai.OpenAI) -> None:
    long = [{"role": "user", "content": "x" * (TINY_CONTEXT + 10)}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TINY_MODEL_NAME, messages=long)  # type: ignore[arg-type]
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=TINY_MODEL_NAME, prompt="abc", max_tokens=TINY_CONTEXT)
    assert info.value.code == "context_length_exceeded"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=USER)  # type: ignore[arg-type]
    assert info.value.code == "model_not_found"


def test_invalid_json_unknown_route_and_method(http: TestClient) -> None:
    bad_json = http.post(
        "/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert bad_json.status_code == 400
    assert bad_json.json()["error"]["code"] == "invalid_json"
    assert http.get("/v1/nothing").status_code == 404
    assert http.get("/v1/nothing").json()["error"]["code"] == "not_found"
    assert http.delete("/v1/models").status_code == 405


def test_out_of_vocab_token_prompt_is_400(http: TestClient) -> None:
    response = http.post("/v1/completions", json={"prompt": [1, 10**9], "max_tokens": 2})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"


def test_model_field_may_be_omitted_with_one_model(http: TestClient) -> None:
    response = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
    assert response.status_code == 200
    assert response.json()["model"] == TINY_MODEL_NAME


def test_server_without_adapter_serves_unsteered(make_app: AppFactory) -> None:
    with TestClient(make_app(adapter=None)) as http:
        ok = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
        assert ok.status_code == 200
        assert ok.json()["safety"]["adapter"] is None
        bad = http.post(
            "/v1/chat/completions",
            json={"messages": USER, "safety": {"categories": {"fraud": 1}}},
        )
        assert bad.status_code == 400


def test_health(http: TestClient) -> None:
    assert http.get("/health").json() == {"status": "ok"}


def test_ignore_eos_and_min_tokens_hold_off_end_of_sequence(
    client: openai.OpenAI, loaded: LoadedModel
) -> None:
    eos = loaded.tokenizer.eos_token_id

    def eos_always_wins(_module: Any, _args: Any, logits: torch.Tensor) -> torch.Tensor:
        logits[..., eos] += 1000.0
        return logits

    loaded.model.lm_head.register_forward_hook(eos_always_wins)
    assert chat(client, max_tokens=40).usage.completion_tokens == 1
    forced = client.chat.completions.create(
        model=TINY_MODEL_NAME, messages=USER, max_tokens=40, extra_body={"ignore_eos": True}
    )
    assert forced.usage is not None and forced.usage.completion_tokens == 40
    assert forced.choices[0].finish_reason == "length"
    at_least = client.chat.completions.create(
        model=TINY_MODEL_NAME, messages=USER, max_tokens=40, extra_body={"min_tokens": 25}
    )
    assert at_least.usage is not None and at_least.usage.completion_tokens == 26
    assert at_least.choices[0].finish_reason == "stop"
