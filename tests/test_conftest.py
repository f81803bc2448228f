"""The test suite's own promise (README command 2): a run without the real datasets says so at its end."""

import pathlib

pytest_plugins = ["pytester"]

CONFTEST = pathlib.Path(__file__).with_name("conftest.py")


def _run(pytester, monkeypatch, data_dir):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(
        test_real="""
        from conftest import real_data_dir

        def test_fashion_mnist():
            real_data_dir("fashion_mnist")

        def test_sst2():
            real_data_dir("glue/sst2")

        def test_mock():
            pass
        """
    )
    if data_dir is None:
        monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    else:
        monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))
    return pytester.runpytest_inprocess("-p", "no:cacheprovider")


def test_skipped_real_data_tests_are_named_at_the_end(pytester, monkeypatch):
    result = _run(pytester, monkeypatch, None)
    result.assert_outcomes(passed=1, skipped=2)
    result.stdout.fnmatch_lines([
        "*= 2 real-data tests skipped =*",
        "2 skipped: set TFDS_DATA_DIR to a folder of prepared TFDS datasets",
        "*point TFDS_DATA_DIR at a folder of prepared TFDS datasets*",
    ])


def test_a_folder_without_one_dataset_names_it(pytester, monkeypatch, tmp_path):
    (tmp_path / "data" / "fashion_mnist").mkdir(parents=True)
    result = _run(pytester, monkeypatch, tmp_path / "data")
    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines(
        ["*= 1 real-data test skipped =*", f"1 skipped: TFDS_DATA_DIR={tmp_path / 'data'} lacks glue/sst2"]
    )
    assert "2 real-data" not in result.stdout.str()
