# Sourced by scripts/test.sh. When root, creates a btrfs and an XFS
# (reflink=1) filesystem in loop files under target/ and exports their mount
# points as PGBRANCH_TEST_BTRFS and PGBRANCH_TEST_XFS; the storage tests run
# every driver on them. Without root only the plain-copy driver runs.
VOL_DIR="$(pwd)/target/test-volumes"

mount_test_volumes() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "test-volumes: not root: btrfs and reflink drivers skipped, copy driver only"
    return 0
  fi
  unmount_test_volumes
  mkdir -p "$VOL_DIR/btrfs" "$VOL_DIR/xfs"
  truncate -s 4G "$VOL_DIR/btrfs.img" "$VOL_DIR/xfs.img"
  mkfs.btrfs -q -f "$VOL_DIR/btrfs.img" >/dev/null
  mkfs.xfs -q -f -m reflink=1 "$VOL_DIR/xfs.img" >/dev/null
  if mount -o loop,user_subvol_rm_allowed "$VOL_DIR/btrfs.img" "$VOL_DIR/btrfs" &&
     mount -o loop "$VOL_DIR/xfs.img" "$VOL_DIR/xfs"; then
    chmod 0755 "$VOL_DIR/btrfs" "$VOL_DIR/xfs"
    export PGBRANCH_TEST_BTRFS="$VOL_DIR/btrfs"
    export PGBRANCH_TEST_XFS="$VOL_DIR/xfs"
    echo "test-volumes: btrfs at $PGBRANCH_TEST_BTRFS, xfs at $PGBRANCH_TEST_XFS"
  else
    echo "test-volumes: loop mounts failed: btrfs and reflink drivers skipped"
  fi
}

unmount_test_volumes() {
  for m in "$VOL_DIR/btrfs" "$VOL_DIR/xfs"; do
    if mountpoint -q "$m" 2>/dev/null; then
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    fi
  done
  rm -f "$VOL_DIR/btrfs.img" "$VOL_DIR/xfs.img"
}
