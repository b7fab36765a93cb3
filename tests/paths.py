"""Where the tests find the project's reference material: inside the repository, so a fresh clone is enough."""
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / 'fixtures'
# reference outputs of the official implementation, with its provenance in official/README.md
OFFICIAL_FIXTURE = FIXTURES / 'official' / 'official_moejet_reference.safetensors'
