// Point-in-time copies of a running VM's image file by reflink (FICLONE): instant, and sharing
// every block with the image until the VM rewrites it, so a backup reads a stable image without
// stopping the VM and without a temporary copy.
#pragma once

#include <string>

namespace diskferry {

// A plain value, deliberately not an owner: the snapshot must outlive a crashed or restarted
// daemon so the retry backs up the same bytes (take_snapshot() finds and reuses it). The job
// removes it with remove_snapshot() once the backup is published or abandoned.
struct Snapshot {
  std::string path;     // a regular file, readable as the image was when it was taken
  bool reused = false;  // an earlier attempt made it; nothing was cloned this time
};

// Where take_snapshot() puts IMAGE's snapshot: SNAPSHOT_DIR/NAME.TAG.snap, NAME being the image's
// file name. An empty snapshot_dir means a hidden ".diskferry-snapshots" directory beside the
// file the image path resolves to (reflinks only work within one filesystem). TAG may hold
// letters, digits and "._:+@-" and must not start with '.'; anything else is Error(Usage).
// The image must exist when snapshot_dir is empty (symlinks are resolved).
std::string snapshot_path(const std::string& image, const std::string& snapshot_dir,
                          const std::string& tag);

// Clones IMAGE to snapshot_path(): into a hidden temporary name, fsync, rename (never replacing),
// fsync of the directory, so a crash never leaves a partial snapshot under the final name. The
// directory is created (mode 0700) if missing, the snapshot is mode 0600. An existing snapshot is
// returned as it is (reused = true). Guest consistency is the pre/post hooks' business
// (hook.hpp): the clone is crash-consistent, like pulling the VM's power cord.
// Errors are diskferry::Error, one line naming the image or the directory: a filesystem that
// cannot reflink names its type and the ways out ("ext4 cannot make reflink copies; use
// snapshot: none, or keep images on XFS (mkfs.xfs -m reflink=1) or btrfs").
Snapshot take_snapshot(const std::string& image, const std::string& snapshot_dir,
                       const std::string& tag);

// Why take_snapshot() of IMAGE into SNAPSHOT_DIR could not work, in take_snapshot()'s words, or
// "" when it could or that cannot be told (IMAGE missing, no right to create files beside it).
// Touches neither the image nor the snapshot directory: it clones between two unnamed O_TMPFILE
// files beside the image (gone when closed) and compares devices. For `diskferry check-config`.
std::string reflink_obstacle(const std::string& image, const std::string& snapshot_dir);

// Deletes a snapshot; one that is already gone is fine (cleanup may be retried after a crash).
// Refuses, as Error(Internal), a path that does not end in ".snap" or is not a regular file, so a
// mix-up can never delete an image.
void remove_snapshot(const std::string& path);

}  // namespace diskferry
