//! virtio-blk on a host file (or block device), one request queue.
//!
//! The file is opened when the device is added (read-only when the device is), so a missing
//! or unreadable image fails `add_device` with the path and the OS error. Requests run on
//! the `db-vmm` thread with positioned reads and writes: `VIRTIO_BLK_T_IN`, `_OUT`,
//! `_FLUSH` (`fsync`), `_GET_ID`. A read-only device offers `VIRTIO_BLK_F_RO` and answers
//! writes with `VIRTIO_BLK_S_IOERR` without touching the file; requests past the end of
//! the image fail the same way. The capacity is the file size in 512-byte sectors, rounded
//! down.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use slog::warn;
use vm_memory::{Bytes, GuestAddress};

use super::queue::DescriptorChain;
use super::{bit, read_config_bytes, QueueCtx, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1};
use crate::error::{Error, Result};
use crate::memory::GuestMem;

/// The device is read-only.
pub const VIRTIO_BLK_F_RO: u32 = 5;
/// The device takes flush requests.
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
/// Read.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Device id string (20 bytes).
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// I/O error (also: a write to a read-only device).
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Sector size of the protocol.
pub const SECTOR: u64 = 512;
/// Length of a `GET_ID` answer.
pub const ID_BYTES: usize = 20;
/// Queue size.
pub const QUEUE_SIZE: u16 = 128;

/// A virtio-blk device on a host file.
#[derive(Debug)]
pub struct BlockDevice {
    path: PathBuf,
    file: File,
    read_only: bool,
    sectors: u64,
    id: [u8; ID_BYTES],
    log: slog::Logger,
}

impl BlockDevice {
    /// Opens `path` (read-only when `read_only`) for a device whose `GET_ID` answer is `id`.
    pub fn open(path: &Path, read_only: bool, id: &str, log: slog::Logger) -> Result<BlockDevice> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| Error::File {
                step: if read_only {
                    "Opening the block image read-only"
                } else {
                    "Opening the block image read-write"
                },
                path: path.to_path_buf(),
                source,
            })?;
        let size_err = |source| Error::File {
            step: "Reading the size of the block image",
            path: path.to_path_buf(),
            source,
        };
        let meta = file.metadata().map_err(size_err)?;
        let kind = meta.file_type();
        let len = if kind.is_file() {
            meta.len()
        } else if kind.is_block_device() {
            // A block device's inode size is 0; its end is its size.
            (&file).seek(SeekFrom::End(0)).map_err(size_err)?
        } else {
            return Err(Error::File {
                step: "Using as a block image",
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a regular file or a block device; give the path of a disk image",
                ),
            });
        };
        let mut idb = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        idb[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(BlockDevice {
            path: path.to_path_buf(),
            file,
            read_only,
            sectors: len / SECTOR,
            id: idb,
            log: log.new(slog::o!("device" => "virtio-blk", "path" => path.display().to_string())),
        })
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Runs one request; returns the status and the bytes written into data buffers.
    fn execute(&self, mem: &GuestMem, chain: &DescriptorChain) -> (u8, u32) {
        let d = &chain.descriptors;
        if d.len() < 2 || d[0].is_write_only() || d[0].len < 16 {
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        let rd32 = |a: u64| mem.read_obj::<u32>(GuestAddress(a)).map(u32::from_le);
        let (ty, sector) = match (
            rd32(d[0].addr),
            mem.read_obj::<u64>(GuestAddress(d[0].addr + 8)),
        ) {
            (Ok(t), Ok(s)) => (t, u64::from_le(s)),
            _ => return (VIRTIO_BLK_S_IOERR, 0),
        };
        let data = &d[1..d.len() - 1];
        let total: u64 = data.iter().map(|x| u64::from(x.len)).sum();
        let in_bounds = || {
            sector
                .checked_mul(SECTOR)
                .and_then(|o| o.checked_add(total))
                .is_some_and(|end| end <= self.sectors * SECTOR)
        };
        let result: std::io::Result<u32> = match ty {
            VIRTIO_BLK_T_IN => {
                if !in_bounds() || data.iter().any(|x| !x.is_write_only()) {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let mut off = sector * SECTOR;
                let mut done = 0u32;
                let mut res = Ok(());
                for x in data {
                    let mut buf = vec![0u8; x.len as usize];
                    res = self.file.read_exact_at(&mut buf, off).and_then(|_| {
                        mem.write_slice(&buf, GuestAddress(x.addr))
                            .map_err(std::io::Error::other)
                    });
                    if res.is_err() {
                        break;
                    }
                    off += u64::from(x.len);
                    done += x.len;
                }
                res.map(|_| done)
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only || !in_bounds() || data.iter().any(|x| x.is_write_only()) {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let mut off = sector * SECTOR;
                let mut res = Ok(());
                for x in data {
                    let mut buf = vec![0u8; x.len as usize];
                    res = mem
                        .read_slice(&mut buf, GuestAddress(x.addr))
                        .map_err(std::io::Error::other)
                        .and_then(|_| self.file.write_all_at(&buf, off));
                    if res.is_err() {
                        break;
                    }
                    off += u64::from(x.len);
                }
                res.map(|_| 0)
            }
            VIRTIO_BLK_T_FLUSH if self.read_only => Ok(0),
            VIRTIO_BLK_T_FLUSH => self.file.sync_all().map(|_| 0),
            VIRTIO_BLK_T_GET_ID => match data.first() {
                Some(x) if x.is_write_only() => {
                    let n = (x.len as usize).min(ID_BYTES);
                    mem.write_slice(&self.id[..n], GuestAddress(x.addr))
                        .map(|_| n as u32)
                        .map_err(std::io::Error::other)
                }
                _ => return (VIRTIO_BLK_S_IOERR, 0),
            },
            _ => return (VIRTIO_BLK_S_UNSUPP, 0),
        };
        match result {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(e) => {
                warn!(self.log, "block request failed"; "type" => ty, "sector" => sector, "error" => %e);
                (VIRTIO_BLK_S_IOERR, 0)
            }
        }
    }

    fn process(&mut self, ctx: &mut QueueCtx<'_>) {
        let mut used = false;
        loop {
            let q = &mut ctx.queues[0];
            let chain = match q.pop(ctx.mem) {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    warn!(self.log, "the request queue is broken"; "error" => %e);
                    break;
                }
            };
            let (status, n) = self.execute(ctx.mem, &chain);
            let mut len = n;
            if let Some(last) = chain
                .descriptors
                .last()
                .filter(|l| l.is_write_only() && l.len > 0)
            {
                if ctx.mem.write_obj(status, GuestAddress(last.addr)).is_ok() {
                    len += 1;
                }
            }
            if let Err(e) = q.add_used(ctx.mem, chain.head, len) {
                warn!(self.log, "the used ring is broken"; "error" => %e);
                break;
            }
            used = true;
        }
        if used {
            ctx.notify_used(0);
        }
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl VirtioDevice for BlockDevice {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_BLK_F_FLUSH);
        if self.read_only {
            f |= bit(VIRTIO_BLK_F_RO);
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config starts with `capacity` (le64); the rest is unused here.
        read_config_bytes(&self.sectors.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, _acked: u64) -> std::result::Result<(), super::ActivateError> {
        Ok(())
    }

    fn queue_event(&mut self, queue: usize, ctx: &mut QueueCtx<'_>) {
        if queue == 0 {
            self.process(ctx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::queue::testing::*;
    use crate::virtio::queue::{VIRTQ_DESC_F_NEXT as NEXT, VIRTQ_DESC_F_WRITE as W};
    use crate::virtio::Interrupt;

    fn image(read_only: bool) -> (tempfile::NamedTempFile, BlockDevice) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..8 * 512).map(|i| (i % 251) as u8).collect();
        std::fs::write(f.path(), &data).unwrap();
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let d = BlockDevice::open(f.path(), read_only, "blk0", log).unwrap();
        (f, d)
    }

    /// Submits header(ty, sector) + one data buffer of `len` (writable for reads) + status.
    fn request(d: &mut BlockDevice, mem: &GuestMem, ty: u32, sector: u64, len: u32) -> (u8, u32) {
        mem.write_obj(ty, GuestAddress(0x8000)).unwrap();
        mem.write_obj(sector, GuestAddress(0x8008)).unwrap();
        let data_flags = if ty == VIRTIO_BLK_T_OUT {
            NEXT
        } else {
            NEXT | W
        };
        set_desc(mem, 0, 0x8000, 16, NEXT, 1);
        set_desc(mem, 1, 0x9000, len, data_flags, 2);
        set_desc(mem, 2, 0xa000, 1, W, 0);
        mem.write_obj(0xffu8, GuestAddress(0xa000)).unwrap();
        publish(mem, 8, &[0]);
        let irq = Interrupt::unwired();
        let mut queues = vec![queue(8)];
        // Skip what earlier requests used.
        let prev: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        for _ in 0..prev {
            queues[0].pop(mem).unwrap();
        }
        let mut ctx = QueueCtx {
            mem,
            queues: &mut queues,
            interrupt: &irq,
        };
        d.process(&mut ctx);
        let (_, head, used_len) = used(mem, prev);
        assert_eq!(head, 0);
        (mem.read_obj(GuestAddress(0xa000)).unwrap(), used_len)
    }

    #[test]
    fn reads_return_the_file_contents_and_the_status() {
        let (_f, mut d) = image(true);
        let mem = mem();
        assert_eq!(d.sectors(), 8);
        assert_eq!(
            request(&mut d, &mem, VIRTIO_BLK_T_IN, 1, 512),
            (VIRTIO_BLK_S_OK, 513)
        );
        let mut buf = [0u8; 4];
        mem.read_slice(&mut buf, GuestAddress(0x9000)).unwrap();
        assert_eq!(
            buf,
            [
                (512 % 251) as u8,
                (513 % 251) as u8,
                (514 % 251) as u8,
                (515 % 251) as u8
            ]
        );
    }

    #[test]
    fn a_read_only_device_refuses_writes_and_says_so_in_its_features() {
        let (f, mut d) = image(true);
        let mem = mem();
        assert_ne!(d.features() & bit(VIRTIO_BLK_F_RO), 0);
        mem.write_slice(&[0xaa; 512], GuestAddress(0x9000)).unwrap();
        assert_eq!(
            request(&mut d, &mem, VIRTIO_BLK_T_OUT, 0, 512).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(std::fs::read(f.path()).unwrap()[0], 0);
    }

    #[test]
    fn writes_reach_the_file_and_requests_past_the_end_fail() {
        let (f, mut d) = image(false);
        let mem = mem();
        mem.write_slice(&[0xaa; 512], GuestAddress(0x9000)).unwrap();
        assert_eq!(
            request(&mut d, &mem, VIRTIO_BLK_T_OUT, 3, 512),
            (VIRTIO_BLK_S_OK, 1)
        );
        assert_eq!(
            &std::fs::read(f.path()).unwrap()[3 * 512..4 * 512],
            &[0xaa; 512][..]
        );
        assert_eq!(
            request(&mut d, &mem, VIRTIO_BLK_T_IN, 8, 512).0,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            request(&mut d, &mem, VIRTIO_BLK_T_FLUSH, 0, 0).0,
            VIRTIO_BLK_S_OK
        );
        assert_eq!(request(&mut d, &mem, 99, 0, 0).0, VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn get_id_returns_the_device_id() {
        let (_f, mut d) = image(true);
        let mem = mem();
        assert_eq!(
            request(&mut d, &mem, VIRTIO_BLK_T_GET_ID, 0, 20),
            (VIRTIO_BLK_S_OK, 21)
        );
        let mut id = [0u8; 5];
        mem.read_slice(&mut id, GuestAddress(0x9000)).unwrap();
        assert_eq!(&id, b"blk0\0");
    }

    #[test]
    fn a_missing_image_is_an_error_naming_the_path() {
        let log = slog::Logger::root(slog::Discard, slog::o!());
        let err =
            BlockDevice::open(Path::new("/nonexistent/disk.img"), true, "b", log).unwrap_err();
        assert!(
            matches!(&err, Error::File { path, .. } if path == Path::new("/nonexistent/disk.img")),
            "{err:?}"
        );
    }
}
