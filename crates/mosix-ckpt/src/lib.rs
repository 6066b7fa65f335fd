//! mosix-ckpt: checkpoint and restore of one unmodified x86_64 Linux process with all its
//! process, without CRIU. The process is frozen with ptrace, its state read from /proc,
//! ptrace and a few system calls injected into it, and streamed as a versioned,
//! checksummed image; restore builds it again inside a fresh traced child.
//!
//! ```no_run
//! use mosix_ckpt::{checkpoint, restore, read_image, DumpOptions, RestoreOptions, Compression};
//! let opts = DumpOptions { leave_running: false, compression: Compression::None };
//! let (bytes, _stats) = checkpoint(1234, Vec::new(), opts, &mut |_, _| {})?;
//! let img = read_image(&bytes[..])?;
//! let new = restore(&img, RestoreOptions::default())?;
//! # Ok::<(), mosix_ckpt::Error>(())
//! ```

mod away;
pub mod check;
mod cpu;
mod creds;
pub mod dirty;
mod dump;
mod error;
mod fdobj;
pub mod homemem;
pub mod image;
pub mod lazy;
mod limits;
mod parse;
mod pipeline;
mod postcopy;
mod precopy;
pub mod procfs;
mod read;
pub mod records;
mod remote;
mod reopen;
mod restore;
mod shmem;
mod stage;
mod stream;
pub use shmem::PLACEHOLDER;
pub mod sum;
pub mod sys;
mod threads;

pub use away::{
    check_moving, checkpoint_moving, checkpoint_moving_live, checkpoint_moving_with, restore_away,
    restore_into, track_moving, Away, Leaving, Rebuilt,
};
pub use creds::{Caps, CredOptions, CredPolicy, Identity};
pub use dump::{check, checkpoint, checkpoint_held, freeze_held, DumpOptions, DumpStats, Held};
pub use error::{Error, Result};
pub use image::{
    memory_room, read_image, read_image_bytes, read_image_file, read_image_streamed, Compression,
    LoadedImage, ProcessImage,
};
pub use pipeline::checkpoint_to;
pub use precopy::{checkpoint_live, LiveOptions, LiveStats, RoundStat};
pub use restore::{
    preflight, restore, restore_lazy, restore_with, resume, Built, RestoreOptions, Restored,
};
pub use stream::{receive, restore_stream, restore_stream_running, Incoming, RanEarly};
