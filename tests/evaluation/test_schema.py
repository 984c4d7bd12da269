"""Bad local copies and model dirs: one line, exit 2, before any model loads (the schema check)."""

import shutil

import datasets
import pytest

from nemo_viper.cli import main
from nemo_viper.evaluation.benchmarks import BENCHMARKS


def _rewrite(tiny_root, root, task, edit):
    """A copy of the tiny ``task`` under ``root`` after ``edit(DatasetDict) -> DatasetDict``."""
    copy = edit(datasets.load_from_disk(str(BENCHMARKS[task].local_dir(tiny_root))))
    copy.save_to_disk(str(BENCHMARKS[task].local_dir(root)))
    return root


def _each_split(function):
    return lambda copy: datasets.DatasetDict({name: function(rows) for name, rows in copy.items()})


def _answer_at(row, value):
    return lambda r, i: {"answer": value if i == row else r["answer"]}


CASES = {  # task, edit, what the line must say
    "missing split": ("realworldqa", lambda copy: datasets.DatasetDict({"val": copy["test"]}),
                      "split 'test' missing (found ['val'])"),
    "empty split": ("mantis", _each_split(lambda rows: rows.select([])), "split 'test': no rows"),
    "missing column": ("mmstar", _each_split(lambda rows: rows.remove_columns("answer")),
                       "split 'val', column 'answer': missing (columns: index, question, image, category"),
    "integer gt_answer": ("hallusion_bench_image",
                          _each_split(lambda rows: rows.cast_column("gt_answer", datasets.Value("int64"))),
                          "split 'image', column 'gt_answer': int, expected string"),
    "answer outside the set": ("mmstar", _each_split(lambda rows: rows.map(_answer_at(3, "E"), with_indices=True)),
                               "split 'val', column 'answer': row 3 holds 'E', expected one of A, B, C, D"),
    "options as one string": ("mantis", _each_split(lambda rows: rows.map(lambda r: {"options": "; ".join(r["options"])})),
                              "split 'test', column 'options': string, expected list of string"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_local_copy_is_one_line_before_the_model(case, tiny_eval_root, tmp_path, model_dir, capsys):
    """``--model`` is no loadable model: the line must be the dataset's, so it came before any model work."""
    task, edit, expected = CASES[case]
    root = _rewrite(tiny_eval_root, tmp_path / "data", task, edit)
    capsys.readouterr()  # the progress bars of the rewrite
    status = main(["eval", "--model", str(model_dir("m", b"w")), "--tasks", task, "--dataset-root", str(root),
                   "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    path = BENCHMARKS[task].local_dir(root)
    assert err.startswith(f"error: eval task {task}: {path}: ") and expected in err, err
    assert not (tmp_path / "o" / "tasks" / f"{task}.json").exists()


def test_a_model_dir_without_processor_files_is_one_line(tiny_hf_dir, tiny_eval_root, tmp_path, capsys):
    hf = shutil.copytree(tiny_hf_dir, tmp_path / "hf", ignore=shutil.ignore_patterns("processor_config.json"))
    status = main(["eval", "--model", str(hf), "--tasks", "realworldqa", "--dataset-root", str(tiny_eval_root),
                   "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {hf}: AutoProcessor cannot load a processor (OSError: ") and \
        "preprocessor_config.json" in err


def test_the_tiny_copies_pass_the_check(tiny_eval_root):
    from nemo_viper.evaluation.schema import check_schemas

    check_schemas(tuple(BENCHMARKS), tiny_eval_root)


def _flip_middle(file):
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 2000] = bytes(b ^ 0xFF for b in data[middle:middle + 2000])
    file.write_bytes(bytes(data))


FILE_CASES = {  # what is done to which file of the copy, what the line must say
    "arrow file missing": ("val/data-00000-of-00001.arrow", lambda f: f.unlink(), "FileNotFoundError"),
    "arrow file truncated": ("val/data-00000-of-00001.arrow", lambda f: f.write_bytes(f.read_bytes()[:300]),
                             "ArrowInvalid: Expected to read"),
    "arrow file with damaged offsets": ("val/data-00000-of-00001.arrow", _flip_middle, "ArrowInvalid: Column"),
    "state.json not JSON": ("val/state.json", lambda f: f.write_text("{not json"), "JSONDecodeError"),
    "dataset_info.json not JSON": ("val/dataset_info.json", lambda f: f.write_text("{"), "JSONDecodeError"),
    "dataset_dict.json without splits": ("dataset_dict.json", lambda f: f.write_text("{}"), "KeyError: 'splits'"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_a_missing_or_corrupt_file_of_a_copy_is_one_line_naming_it(case, tiny_eval_root, tmp_path, model_dir,
                                                                    capsys):
    name, damage, detail = FILE_CASES[case]
    root = tmp_path / "data"
    path = BENCHMARKS["mmstar"].local_dir(root)
    shutil.copytree(BENCHMARKS["mmstar"].local_dir(tiny_eval_root), path)
    damage(path / name)
    status = main(["eval", "--model", str(model_dir("m", b"w")), "--tasks", "mmstar", "--dataset-root", str(root),
                   "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: eval task mmstar: {path}: {name} is missing or corrupt (") and detail in err, err
