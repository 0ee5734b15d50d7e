import pytest
import torch
from helpers import MetadataStandIn, free_port, start_hub

from resnet50_recipe.data.synthetic import generate

# The fast tier, `make test-fast` (pytest -m "not slow and not gpu"), runs in about 2 minutes on 2 CPU cores and
# still imports and exercises every module of the package; `make test` runs everything. The tests below are marked
# slow and left out of it, as "file" (every test in it), "file::test" (every parametrization) or "file::test[id]",
# and so is every test that takes the smoke_run fixture: the trained smoke run alone is ~90 s (test_inspect_tiny.py
# checks predict, explain, watch and report on a 2-step run instead). What the tier keeps of each kind: one exact
# resume across processes (test_storage.py's fresh machine resuming from S3 after a SIGTERM, ~20 s), the in-process
# bitwise resumes of test_train.py, every S3 test against moto that takes under 3 s, the CLI in-process and, in
# subprocesses, test_errors.py's one-line errors and test_resume.py's signal handling. Seconds measured alone,
# 2026-12-05.
SLOW = {
    # (the fast tier's slowest, ~100 s together: `make test-fast` stays under 3 minutes on 2 cores)
    "test_aws.py::test_a_crash_count_that_cannot_be_written_ends_the_run_and_a_failed_end_still_says_so",
    "test_aws.py::test_follow_of_a_relaunch_reads_no_summary_of_the_runs_earlier_instance",
    "test_aws.py::test_the_hub_token_is_deleted_when_the_run_ends_and_by_aws_stop",
    "test_aws.py::test_the_run_role_reads_no_spot_request_and_the_end_of_run_path_still_releases_its_own",
    "test_aws.py::test_the_end_of_run_path_keeps_an_unsynced_run_or_a_kept_instance",
    "test_errors.py::test_a_bug_inside_the_training_step_keeps_its_traceback_and_exits_1",
    "test_errors.py::test_a_bad_recipe_key_is_one_line_and_exit_2",
    "test_lifecycle.py::test_a_sigterm_to_the_whole_process_group_is_a_stop_with_a_checkpoint",
    "test_lifecycle.py::test_an_unreadable_jpeg_is_one_line_through_a_loader_worker_and_keeps_the_work_done",
    "test_storage.py::test_an_unreachable_store_at_start_says_so_at_once_and_ctrl_c_stops_the_wait",
    "test_resume.py::test_signals_ask_for_a_stop_and_a_second_sigint_exits_at_once",
    "test_storage.py::test_fresh_machine_resume_from_s3_is_bitwise_identical",
    "test_aws.py::test_a_crash_loop_ends_after_max_crashes_and_74_and_75_never_count",
    "test_lifecycle.py::test_a_final_upload_that_hangs_is_said_while_it_is_waited_for",
    "test_ddp.py",  # every run through torchrun with 2 processes (and a 1-process twin): ~100 s in all
    "test_nodes.py",  # torchrun runs: a 30 s push under a short timeout; two nodes, three times: ~150 s in all
    "test_sky.py::test_the_run_section_on_two_machines_stops_on_sigterm_and_resumes_bitwise",  # two nodes, 3 times
    "test_sky.py::test_exit_2_ends_the_job_for_good_and_a_new_job_of_the_run_starts_again",  # 3 two-node starts
    # whole trainings in subprocesses, stopped or killed, then resumed: 5-26 s each
    "test_resume.py::test_sigterm_mid_epoch_then_resume_is_bitwise_identical",
    "test_resume.py::test_sigkill_during_a_save_resumes_from_the_previous_good_checkpoint",
    "test_resume.py::test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one",
    "test_resume.py::test_spot_notice_checkpoints_and_exits_75_within_seconds",
    "test_resume.py::test_resume_refuses_a_changed_recipe_with_a_diff",
    "test_aws.py::test_the_cost_carried_across_a_kill_counts_every_starts_time",
    "test_lifecycle.py::test_sigterm_during_a_slow_evaluation_exits_at_once_and_the_resumed_run_is_identical",
    "test_lifecycle.py::test_ddp_stop_every_rank_waits_for_rank_0s_checkpoint",
    "test_lifecycle.py::test_a_sigterm_to_the_whole_process_group_is_a_stop_with_a_checkpoint[evaluation]",
    "test_lifecycle.py::test_a_sigterm_to_the_whole_process_group_is_a_stop_with_a_checkpoint[worker start-up]",
    # a fresh `python -m resnet50_recipe` (3-4 s of imports) per case, many cases; test_errors.py keeps the
    # one-line errors of the CLI in the tier, test_resume.py its signal handling
    "test_lifecycle.py::test_bad_recipe_files_are_one_clear_line",
    "test_lifecycle.py::test_bad_arguments_are_one_clear_line",
    "test_lifecycle.py::test_settings_that_would_fail_after_training_fail_before_it",
    "test_lifecycle.py::test_sigterm_during_set_up_exits_75_and_changes_nothing",
    "test_lifecycle.py::test_a_second_trainer_on_the_same_directory_fails_at_once",
    "test_lifecycle.py::test_a_killed_holders_forked_children_do_not_keep_its_lock",
    "test_lifecycle.py::test_only_a_second_sigint_exits_at_once_whatever_asked_for_the_stop_first",
    "test_lifecycle.py::test_an_unreadable_jpeg_is_one_line_through_a_loader_worker_and_keeps_the_work_done[zero-byte]",
    "test_storage.py::test_missing_credentials_fail_with_a_clear_message",
    "test_storage.py::test_missing_permission_fails_fast_with_a_clear_message",
    "test_storage.py::test_on_ec2_a_slow_instance_role_is_waited_for_not_refused",
    "test_sources.py::test_sigterm_mid_unpack_then_rerun_finishes_with_the_right_counts",
    "test_sources.py::test_hub_download_resumes_a_dropped_file_then_unpacks",
    "test_sources.py::test_hub_token_from_hf_token_opens_a_gated_repo",
    "test_sources.py::test_hub_webdataset_repo",
    "test_sources.py::test_hub_refusals_are_one_line",
    "test_recipe.py::test_console_script_runs",
    "test_recipe.py::test_wheel_ships_recipes_and_resolves_them_without_the_repository",
    "test_aws.py::test_an_index_release_ships_the_installed_wheel_and_a_wheel_install_ships_its_wheel",
    "test_aws.py::test_the_cli_runs_against_a_moto_server_through_aws_endpoint_url",
    # seconds of waiting or compiling: S3 outages and their back-off (4-30 s), torch.compile (4 s warm, a minute
    # cold), resnet10t with 2 loader workers (5 s), the larger recipes' models (2-4 s each; imagenet-fast-32 stays)
    "test_storage.py::test_a_5xx_storm_at_start_up_is_retried_then_exits_75_and_no_such_bucket_exits_2",
    "test_storage.py::test_server_down_mid_upload_training_goes_on_and_the_pointer_stays_valid",
    "test_lifecycle.py::test_with_s3_down_a_stop_ends_by_its_deadline",
    "test_lifecycle.py::test_a_sigterm_with_the_store_stalled_ends_within_one_stop_timeout",
    "test_speed.py::test_compiled_model_trains_and_recompiles_when_the_resolution_changes",
    "test_train.py::test_deterministic_runs_give_identical_weights_from_library_and_cli",
    "test_train.py::test_every_shipped_recipe_trains_under_a_tiny_overlay[imagenet-100ep]",
    "test_train.py::test_every_shipped_recipe_trains_under_a_tiny_overlay[imagenet-81]",
    "test_train.py::test_every_shipped_recipe_trains_under_a_tiny_overlay[imagenet-fast-16]",
    "test_train.py::test_every_shipped_recipe_trains_under_a_tiny_overlay[imagenet-fast-24]",
    "test_train.py::test_every_shipped_recipe_trains_under_a_tiny_overlay[imagenet-fast-40]",
    "test_train.py::test_every_shipped_recipe_trains_under_a_tiny_overlay[imagenet-fast-56]",
    "test_train.py::test_every_shipped_recipe_trains_under_a_tiny_overlay[imagenet-fast-88]",
    "test_train.py::test_every_shipped_recipe_trains_under_a_tiny_overlay[kaggle-sample]",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        file = item.path.name
        keys = {file, f"{file}::{getattr(item, 'originalname', item.name)}", f"{file}::{item.name}"}
        if keys & SLOW or "smoke_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
        if file == "test_journey.py":  # `make journey` runs these, in a pass of their own
            item.add_marker(pytest.mark.journey)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    """`make journey`: one line per scenario of tests/test_journey.py that ran, with what it checked."""
    import sys

    journey = sys.modules.get("journey")
    if journey is not None and journey.RESULTS:
        terminalreporter.section("journey")
        for name, checked, seconds in journey.RESULTS:
            terminalreporter.write_line(f"{name:<26} {seconds:5.0f} s  {checked}")


@pytest.fixture(autouse=True)
def fresh_metadata_stand_in():
    """MetadataStandIn keeps what a test posts (a spot notice, a rebalance recommendation) on the class, where a
    later test's stand-in (a subclass) would inherit it: every test starts without."""
    yield
    MetadataStandIn.notice = MetadataStandIn.rebalance = None
    MetadataStandIn.requests = []


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A real JPEG ImageFolder: 3 classes, 8 train and 4 val images each, 32 px."""
    return generate(tmp_path_factory.mktemp("data") / "tiny", classes=3, per_class=8, val_per_class=4, size=32)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The shipped smoke recipe, unchanged but for where it writes, trained once per session (~70 s on 2 cores):
    test_train checks its accuracy; the TensorBoard, predict, explain, watch and report tests inspect it.
    Tests must not change its run directory (copy it first)."""
    from types import SimpleNamespace

    from resnet50_recipe import load_recipe, train

    base = tmp_path_factory.mktemp("smoke")
    recipe = load_recipe("smoke", [f"data.path={base / 'shapes'}"])
    summary = train(recipe, base / "run", quiet=True)
    return SimpleNamespace(dir=base / "run", data=base / "shapes", summary=summary, recipe=recipe)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto in server mode on 127.0.0.1: real HTTP S3, never AWS. Subprocesses inherit the fake credentials."""
    import os

    from moto.server import ThreadedMotoServer

    fake = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in fake}
    os.environ.update(fake)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def bucket(s3_endpoint, request):
    import re

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + "-b"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A HubStandIn (helpers.py) storing under tmp_path/hub, reached by huggingface_hub in this process (its
    constants.ENDPOINT, read at import) and in subprocesses (HF_ENDPOINT). Yields .endpoint, .root (repo me/x is
    .root/me/x), .requests and .handler: set hub.handler.refuse = 401 to refuse every request; hub.handler.private
    maps each repo id to whether it is private. Set HF_TOKEN to an hf_... token yourself."""
    from types import SimpleNamespace

    import huggingface_hub.constants

    server, endpoint = start_hub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    handler = server.RequestHandlerClass
    yield SimpleNamespace(endpoint=endpoint, root=tmp_path / "hub", requests=handler.requests, handler=handler)
    server.shutdown()
    server.server_close()
