#!/usr/bin/env bash
# Size of a serving image and of its largest Python packages (what makes the archive the image
# role copies to every node). Prints figures; changes nothing (a throw-away container reads them).
#   benchmarks/image_size.sh [IMAGE]    default: vllm-fleet:lab (images/cpu/build.sh's tag)
set -euo pipefail
image=${1:-vllm-fleet:lab}
docker image inspect "$image" --format 'image {{.RepoTags}} id {{.Id}} created {{.Created}}'
docker image inspect "$image" --format '{{.Size}}' | awk '{printf "size %.2f GB (%.0f bytes)\n", $1/1e9, $1}'
echo "largest site-packages entries (MB):"
timeout 300 docker run --rm --network=none --entrypoint sh "$image" -c \
  'cd "$(python3 -c "import sysconfig; print(sysconfig.get_paths()[\"purelib\"])")" && du -sm -- * | sort -rn | head -12'
