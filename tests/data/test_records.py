"""Record schemas (nemo_viper.data.records): round trip, ground truth, validation errors."""

import pytest

from nemo_viper.data import CaptionRefineRecord, RecordError, VisualOpRecord, ground_truth, parse_record
from nemo_viper.errors import NemoViperError


def caption_dict(**changes):
    d = {
        "task": "caption_refine",
        "id": "cap-1",
        "images": ["img0.png"],
        "initial_caption": "A cat on a sofa.",
        "refinements": ["The cat is orange, not grey.", "There is a cushion on the left."],
        "refined_caption": "An orange cat on a sofa next to a cushion.",
        "source": "skimage:chelsea",
        "synth_ckpt": "ckpt_0",
        "recon_image": None,
    }
    d.update(changes)
    return {k: v for k, v in d.items() if v is not ...}


def visual_op_dict(**changes):
    d = {
        "task": "visual_op",
        "id": "op-1",
        "images": ["img0.png", "img1.png"],
        "operations": ["Change the cat's colour to black."],
        "hard_entities": ["cat"],
        "source_caption": "An orange cat on a sofa.",
        "edit_pipeline": "QwenImageEditPipeline",
        "synth_ckpt": "ckpt_a",
    }
    d.update(changes)
    return {k: v for k, v in d.items() if v is not ...}


def test_round_trip_and_ground_truth():
    caption = parse_record(caption_dict(recon_image="recon.png"))
    assert isinstance(caption, CaptionRefineRecord)
    assert caption.images == ("img0.png",) and caption.recon_image == "recon.png"
    assert parse_record(caption.to_dict()) == caption
    assert ground_truth(caption) == ["The cat is orange, not grey.", "There is a cushion on the left."]

    op = parse_record(visual_op_dict())
    assert isinstance(op, VisualOpRecord)
    assert op.to_dict() == visual_op_dict()
    assert ground_truth(op) == ["Change the cat's colour to black."]


def test_constructor_takes_lists():
    record = VisualOpRecord(
        id="op-2", images=["a", "b"], operations=["Remove the cup."], hard_entities=["cup"],
        source_caption="A cup.", edit_pipeline="p", synth_ckpt="",
    )
    assert record.operations == ("Remove the cup.",)
    assert parse_record(record.to_dict()) == record


def test_recon_image_is_optional():
    assert parse_record(caption_dict(recon_image=...)).recon_image is None


@pytest.mark.parametrize(
    "d, skip_reason",
    [
        (caption_dict(refinements=...), "missing_field:refinements"),
        (caption_dict(initial_caption=None), "missing_field:initial_caption"),
        (visual_op_dict(operations=...), "missing_field:operations"),
        (caption_dict(task=...), "missing_field:task"),
        (caption_dict(task="segmentation"), "invalid_field:task"),
        (caption_dict(refinements=[]), "invalid_field:refinements"),
        (caption_dict(refinements=[f"fix {i}" for i in range(9)]), "invalid_field:refinements"),
        (caption_dict(refinements=["ok", ""]), "invalid_field:refinements"),
        (caption_dict(refinements="one string"), "invalid_field:refinements"),
        (caption_dict(images=["a.png", "b.png"]), "invalid_field:images"),
        (visual_op_dict(images=["a.png"]), "invalid_field:images"),
        (visual_op_dict(operations=["a op", "b op", "c op", "d op"]), "invalid_field:operations"),
        (visual_op_dict(hard_entities=[]), "invalid_field:hard_entities"),
        (visual_op_dict(edit_pipeline=3), "invalid_field:edit_pipeline"),
        (visual_op_dict(recon_image="recon.png"), "invalid_field:recon_image"),
        (caption_dict(score=0.5), "invalid_field:score"),
    ],
)
def test_invalid_records_name_field_and_id(d, skip_reason):
    with pytest.raises(RecordError) as info:
        parse_record(d)
    field = skip_reason.split(":")[1]
    assert info.value.skip_reason == skip_reason
    assert repr(field) in str(info.value) and repr(d["id"]) in str(info.value)
    assert isinstance(info.value, NemoViperError)


def test_missing_id_and_non_object():
    with pytest.raises(RecordError, match=r"record '<no id>': missing field 'id'"):
        parse_record(caption_dict(id=...))
    with pytest.raises(RecordError, match="expected a JSON object"):
        parse_record(["not", "a", "record"])
