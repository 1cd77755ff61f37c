"""Entry point: python -m normscale.data <overrides>."""
from normscale.cli import hydra_main
from normscale.data.summary import prepare_and_summarise

if __name__ == "__main__":
    hydra_main(prepare_and_summarise)
