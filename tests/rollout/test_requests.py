"""Requests, prompts, batching plans, masks and stop strings: the parts that need no Megatron process."""

import pytest
import torch
from PIL import Image

from nemo_viper.errors import ConfigError
from nemo_viper.models.processor import load_processor
from nemo_viper.rollout import GenerationRequest, SamplingParams
from nemo_viper.rollout.megatron_model import right_pad
from nemo_viper.rollout.stopping import cut_at_stop_string, find_stop_strings, stop_window


@pytest.fixture(scope="module")
def processor(tiny_hf_dir):
    return load_processor(tiny_hf_dir)


def test_oversize_image_is_resized_to_the_pixel_budget(processor):
    budget = processor.image_processor.size["longest_edge"]
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    request = GenerationRequest.from_chat(processor, chat, [Image.new("RGB", (3000, 2000), "red")], n=5)
    ((t, h, w),) = request.image_grid_thw.tolist()
    assert t == 1 and h * w * 14 * 14 <= budget and w > h  # within budget, aspect ratio kept
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((request.prompt_ids == image_pad).sum()) == h * w // 4
    assert request.pixel_values.shape[0] == h * w and request.n == 5


def test_requests_match_the_processor_with_pil_or_preprocessed_images(processor, tiny_hf_dir):
    """Token ids exactly as the HF processor's own call returns them (placeholder expansion), whether the
    images are PIL images or already preprocessed by the DALI pipeline (shared, not copied)."""
    import io

    import skimage.data

    from nemo_viper.data.images import QwenImagePreprocessor

    photos = [Image.fromarray(skimage.data.astronaut()).resize((300, 200)), Image.fromarray(skimage.data.coffee())]
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    expected = processor(text=[text], images=photos, return_tensors="pt")

    from_pil = GenerationRequest.from_chat(processor, chat, photos)
    assert torch.equal(from_pil.prompt_ids, expected["input_ids"][0])
    assert torch.equal(from_pil.pixel_values, expected["pixel_values"])

    encoded = []
    for photo in photos:
        buffer = io.BytesIO()
        photo.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    [prepared] = QwenImagePreprocessor.from_pretrained(tiny_hf_dir, "dali", device="cpu")([encoded])
    from_prepared = GenerationRequest.from_chat(processor, chat, prepared, n=5)
    assert torch.equal(from_prepared.prompt_ids, expected["input_ids"][0])
    assert torch.equal(from_prepared.image_grid_thw, expected["image_grid_thw"])
    assert from_prepared.pixel_values is prepared.pixel_values
    assert (from_prepared.pixel_values - expected["pixel_values"]).abs().mean() < 1e-3
    with pytest.raises(ValueError, match="2 image placeholders but 1 processed images"):
        GenerationRequest.from_chat(processor, chat, photos[:1])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(stop_strings="</answer>"), "stop_strings"),
        (dict(seed=-3), "seed"),
    ],
)
def test_sampling_params_reject_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SamplingParams(**kwargs)


def test_request_validation():
    assert GenerationRequest([1, 2, 3]).prompt_ids.dtype == torch.long
    with pytest.raises(ConfigError, match="n=0"):
        GenerationRequest([1, 2], n=0)
    # the image check is the one PolicyBatch uses too (data.images.check_patches): a ValueError, not a config error
    with pytest.raises(ValueError, match="together"):
        GenerationRequest([1, 2], pixel_values=torch.zeros(4, 1176))
    with pytest.raises(ValueError, match="patches"):
        GenerationRequest([1, 2], pixel_values=torch.zeros(3, 1176), image_grid_thw=torch.tensor([[1, 2, 2]]))


def test_right_padding():
    ids, padding = right_pad([torch.tensor([5, 6, 7]), torch.tensor([8])], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert padding.tolist() == [[False, False, False], [False, True, True]]


def test_stop_strings(processor):
    tokenizer = processor.tokenizer
    ids = tokenizer("The red car is on the left.</answer> more")["input_ids"]
    window = stop_window(["</answer>"])
    assert window >= 4 * len("</answer>")
    assert find_stop_strings(tokenizer, [ids[-window:], ids[:3]], [("</answer>",), ("</answer>",)]) == [True, False]
    text = "<answer>a</answer> b </answer>"
    assert cut_at_stop_string(text, ["</answer>", "b"], include=False) == "<answer>a"
    assert cut_at_stop_string(text, ["</answer>", "b"], include=True) == "<answer>a</answer>"
    assert cut_at_stop_string(text, ["zzz"], include=False) == text


def test_an_eos_or_stop_string_on_the_last_allowed_token_is_not_a_truncation(processor):
    """With a budget of 2 tokens, the 2nd token decides: EOS -> "eos", a stop string -> "stop", else "length"."""
    from nemo_viper.rollout.stopping import SampleLog

    tokenizer = processor.tokenizer
    word, other, stop = (tokenizer.encode(text, add_special_tokens=False)[0] for text in ("a", "b", "x"))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    params = [SamplingParams(max_new_tokens=2), SamplingParams(max_new_tokens=2),
              SamplingParams(max_new_tokens=2, stop_strings=("x",))]
    samples = SampleLog(params, torch.tensor([2, 2, 2]), torch.tensor([eos]), tokenizer)
    rows = torch.arange(3)
    assert not samples.record(0, rows, torch.tensor([word, word, word]), torch.zeros(3)).any()
    assert samples.record(1, rows, torch.tensor([eos, other, stop]), torch.zeros(3)).all()
    responses = samples.responses()
    assert [r.finish_reason for r in responses] == ["eos", "length", "stop"]
    assert [len(r.token_ids) for r in responses] == [2, 2, 2]
