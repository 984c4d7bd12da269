#!/usr/bin/bash
cd /opt/nemo_viper && python -m nemo_viper.cli tiny-model --out /tmp/pytest-of-root/pytest-74/test_every_leaf_key_reaches_a_0/run_cluster.job_dir/base_model --warm-start-steps 150