#!/usr/bin/env bash
# Make a local stand-in for the official `debian:bookworm-slim` image with debootstrap, for a
# host that has podman but cannot reach a registry (CI here). The Dockerfiles start FROM that
# name, so on a real Docker host they pull the official image and build unchanged.
#
#   docker/base-image.sh [TAG]        default TAG: docker.io/library/debian:bookworm-slim
#
# What the official slim image does and this copies (written from Debian's documented
# behaviour, not copied from its build scripts): the minbase variant, APT sources for
# bookworm, bookworm-updates and bookworm-security, no docs/man pages/locales installed by
# dpkg, APT's package cache cleaned after each install, empty package lists. Packages come from
# the Debian mirror that this host's APT uses. Idempotent: an existing TAG is kept (the cache);
# FORCE=1 rebuilds it.
set -euo pipefail

TAG=${1:-docker.io/library/debian:bookworm-slim}
SUITE=bookworm

if [ "${FORCE:-0}" != 1 ] && podman image exists "$TAG"; then
  echo "base image $TAG: present (cached)"
  exit 0
fi
for tool in debootstrap podman; do
  command -v "$tool" >/dev/null || { echo "base-image.sh: $tool is not installed" >&2; exit 1; }
done

# The mirror this host's APT uses (deb822 or one-line sources), else Debian's CDN.
mirror=$(
  { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
    grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}'
  } | grep -v -- '-security' | grep -m1 '/debian/\?$' || true
)
mirror=${mirror:-http://deb.debian.org/debian}
mirror=${mirror%/}
security=${mirror%/debian}/debian-security

work=$(mktemp -d /var/tmp/atop-base.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
echo "base image $TAG: debootstrap --variant=minbase $SUITE from $mirror"
t0=$(date +%s)
nice -n 19 debootstrap --variant=minbase "$SUITE" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -20 "$work/debootstrap.log" >&2
  echo "base-image.sh: debootstrap failed (log above)" >&2
  exit 1
}

# APT sources as in the official image (deb822).
rm -f "$root/etc/apt/sources.list"
cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
# Slim: dpkg skips documentation and translations; APT keeps no downloaded .debs.
cat >"$root/etc/dpkg/dpkg.cfg.d/slim-excludes" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
printf 'Acquire::Languages "none";\n' >"$root/etc/apt/apt.conf.d/docker-no-languages"
# What debootstrap installed before the excludes existed, and its caches.
find "$root/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/lintian/*
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/*
rm -rf "$root"/var/log/* "$root"/tmp/* "$root"/var/tmp/*
# No host identity in the image.
: >"$root/etc/hostname"
rm -f "$root/etc/resolv.conf" "$root/etc/machine-id" "$root/var/lib/dbus/machine-id"

tar --numeric-owner -C "$root" -c . | podman import --quiet \
  --change 'CMD ["bash"]' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change "LABEL org.opencontainers.image.description=local-debootstrap-stand-in-for-debian:$SUITE-slim" \
  --message "debootstrap --variant=minbase $SUITE $mirror" \
  - "$TAG" >/dev/null
echo "base image $TAG: made in $(($(date +%s) - t0)) s, $(podman image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}')"
