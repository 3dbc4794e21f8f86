"""Part-mark scanners (ISO/IEC 15434, MH10.8.2 DIs, ATA Spec 2000 TEIs): topic kind `partmark_scanner`."""
