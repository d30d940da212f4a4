//! Writing a frame (header and payload) with as few system calls as possible.

use std::io::{self, IoSlice};

use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Writes `header` then `payload`. Small frames collect in the writer's buffer; a payload larger
/// than the buffer goes out in one vectored write together with the header, without a copy.
///
/// # Errors
/// Any write error; `WriteZero` when the stream stops taking bytes.
pub(crate) async fn write_frame<W: AsyncWrite + Unpin>(
    out: &mut W,
    header: &[u8],
    payload: &[u8],
) -> io::Result<()> {
    let mut bufs = [IoSlice::new(header), IoSlice::new(payload)];
    let mut slices: &mut [IoSlice<'_>] = &mut bufs;
    while !slices.is_empty() {
        let n = out.write_vectored(slices).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "the connection stopped taking bytes"));
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}
