#!/usr/bin/env bash
# Install the services the tests start for real when they are missing: Orthanc and its DICOMweb plugin
# (Debian packages) for the PACS tests. Needs root (CI runs as root) and the Debian package archive; does
# nothing when Orthanc and the plugin are present. The Debian package's own service is not used: the tests
# start their own Orthanc on a free loopback port with a temporary configuration and storage.
set -euo pipefail
plugin=/usr/share/orthanc/plugins/libOrthancDicomWeb.so
if [ -x /usr/sbin/Orthanc ] && [ -f "$plugin" ]; then
  echo "orthanc already installed: $(/usr/sbin/Orthanc --version 2>/dev/null | head -1)"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_services.sh: root is needed to install orthanc with apt-get" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends orthanc orthanc-dicomweb
# The package starts a system Orthanc on port 8042 where a service manager runs; the tests need none.
if command -v service >/dev/null 2>&1; then service orthanc stop >/dev/null 2>&1 || true; fi
/usr/sbin/Orthanc --version | head -1
