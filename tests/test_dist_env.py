from normscale.dist import ProcessInfo, process_info


def test_process_info_reads_launchers_then_slurm_then_defaults():
    assert process_info({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}) \
        == ProcessInfo(3, 8, 1)
    assert process_info({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2"}) == ProcessInfo(5, 6, 2)
    single = process_info({"SLURM_PROCID": "5"})
    assert single == ProcessInfo(0, 1, 0) and single.is_main and not ProcessInfo(1, 2, 1).is_main
