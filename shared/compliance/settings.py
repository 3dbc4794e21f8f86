"""Compliance settings from the `[compliance]` section of the config (and its MRO_COMPLIANCE_* overrides)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.runtime.config import DEFAULT_CONFIG, Config

DEFAULT_REGISTRIES = DEFAULT_CONFIG.parent / "registries"


@dataclass(frozen=True)
class ComplianceSettings:
    registries_dir: Path
    authority_public_key: Path
    schema_tolerance: float = 0.02
    dry_run_sample: int = 10_000
    registry_check_s: float = 1.0

    @property
    def tolerance_ppm(self) -> int:
        return round(self.schema_tolerance * 1_000_000)


def compliance_settings(config: Config) -> ComplianceSettings:
    section = config.compliance
    return ComplianceSettings(
        registries_dir=Path(section.registries_dir) if section.registries_dir else DEFAULT_REGISTRIES,
        authority_public_key=(Path(section.authority_public_key) if section.authority_public_key
                              else config.data_path / "keys" / "registry-authority.pub.pem"),
        schema_tolerance=section.schema_tolerance,
        dry_run_sample=section.dry_run_sample,
        registry_check_s=section.registry_check_s,
    )
