//! Making an image: [`create_image`], and [`parse_size`] for the sizes a
//! user types.

use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use crate::image::SECTOR;
use crate::{ImageError, SizeError};

/// Create a sparse image of `size_bytes` (a positive multiple of 512) at
/// `path`, whose directory must exist, and sync it and its directory.
///
/// An existing image of exactly that size is kept as it is (its data
/// too): creating is idempotent. An existing file of another size is never
/// resized or overwritten ([`ImageError::Exists`]): the caller removes it
/// first if that is what the user asked for.
pub fn create_image(path: impl AsRef<Path>, size_bytes: u64) -> Result<(), ImageError> {
    let path = path.as_ref();
    if size_bytes == 0 || size_bytes % SECTOR != 0 {
        return Err(ImageError::BadSize { size: size_bytes });
    }
    let io = |what: &'static str| move |err: io::Error| ImageError::Io { path: path.to_owned(), what, err };
    match fs::OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(file) => {
            let made = file.set_len(size_bytes).and_then(|()| file.sync_all());
            if let Err(err) = made {
                let _ = fs::remove_file(path);
                return Err(io("size")(err));
            }
            let dir = match path.parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir,
                _ => Path::new("."),
            };
            File::open(dir).and_then(|dir| dir.sync_all()).map_err(io("sync the directory of"))
        }
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
            let meta = fs::metadata(path).map_err(io("inspect"))?;
            let size = if meta.is_file() {
                meta.len()
            } else if meta.file_type().is_block_device() {
                File::open(path).and_then(|mut dev| dev.seek(SeekFrom::End(0))).map_err(io("find the size of"))?
            } else {
                return Err(ImageError::NotAnImage { path: path.to_owned(), kind: "directory or special file" });
            };
            if size == size_bytes {
                Ok(())
            } else {
                Err(ImageError::Exists { path: path.to_owned(), size, wanted: size_bytes })
            }
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => Err(ImageError::NoDirectory { path: path.to_owned() }),
        Err(err) => Err(io("create")(err)),
    }
}

/// A size in bytes: `4096`, or a whole number with `K`, `M`, `G` or `T`
/// (powers of 1024; lower case and a trailing `iB` are accepted: `64M`,
/// `64m`, `64MiB`).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let invalid = || SizeError::Invalid(text.to_owned());
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    if number.is_empty() {
        return Err(invalid());
    }
    let shift = match unit {
        "" => 0,
        "K" | "k" | "KiB" | "kiB" => 10,
        "M" | "m" | "MiB" | "miB" => 20,
        "G" | "g" | "GiB" | "giB" => 30,
        "T" | "t" | "TiB" | "tiB" => 40,
        _ => return Err(invalid()),
    };
    let too_large = || SizeError::TooLarge(text.to_owned());
    let number: u64 = number.parse().map_err(|_| too_large())?;
    number.checked_mul(1 << shift).ok_or_else(too_large)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("0"), Ok(0));
    }

    #[test]
    fn bad_sizes() {
        for text in ["", "M", "1.5G", "-1", " 64M", "64 M", "64MB", "64X", "0x100", "64Mi"] {
            assert_eq!(parse_size(text), Err(SizeError::Invalid(text.to_owned())), "{text:?}");
        }
        for text in ["99999999999999999999", "16777216T"] {
            assert_eq!(parse_size(text), Err(SizeError::TooLarge(text.to_owned())), "{text:?}");
        }
        assert_eq!(parse_size("16777215T"), Ok(16777215 << 40));
        assert_eq!(
            SizeError::Invalid("1.5G".into()).to_string(),
            "`1.5G` is not a size: give bytes (4096) or a whole number with K, M, G or T (powers of 1024), e.g. 64M"
        );
    }
}
