"""The run config's YAML parts (``conf/<group>/<part>.yaml``) and recipes (``conf/recipes/<name>.yaml``), installed
as the package data of ``nemo_viper.conf`` (see :mod:`nemo_viper.config`)."""
