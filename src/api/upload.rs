//! Audio uploads (`multipart/form-data`, DESIGN §3): the `model` form field, read to
//! route the request, and replaced by the deployment for an upstream that reads it from
//! the body. Everything else is forwarded as the client sent it.

use crate::error::Error;
use std::ops::Range;

/// The `boundary` of a `multipart/form-data` content type.
fn boundary(content_type: &str) -> Option<&str> {
    let (kind, params) = content_type.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.split(';').find_map(|p| {
        let (name, value) = p.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| value.trim().trim_matches('"'))
            .filter(|b| !b.is_empty())
    })
}

fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    haystack
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
}

/// Where the value of the `model` field lies in `body`. Every part is read: a second
/// `model` part is refused, since the proxy would route on one and the upstream might
/// read the other.
fn model_range(body: &[u8], content_type: Option<&str>) -> Result<Range<usize>, Error> {
    let invalid = |why: &str| Error::InvalidUpload(why.to_string());
    let boundary = content_type
        .and_then(boundary)
        .ok_or_else(|| invalid("the request must be multipart/form-data with a boundary"))?;
    // Every delimiter but the first follows a CRLF, which belongs to it.
    let delimiter = format!("\r\n--{boundary}");
    let delimiter = delimiter.as_bytes();
    let mut at = find(body, &delimiter[2..], 0).ok_or_else(|| invalid("no part in the body"))?;
    let mut length = delimiter.len() - 2;
    let mut found = None;
    loop {
        let head_start = at + length;
        if body.get(head_start..head_start + 2) == Some(b"--") {
            return found.ok_or(Error::MissingModel);
        }
        let head_end =
            find(body, b"\r\n\r\n", head_start).ok_or_else(|| invalid("a part has no end"))?;
        let content = head_end + 4;
        let end = find(body, delimiter, content).ok_or_else(|| invalid("a part has no end"))?;
        if is_model(&body[head_start..head_end]) {
            if found.is_some() {
                return Err(invalid("the upload has more than one model field"));
            }
            found = Some(content..end);
        }
        at = end;
        length = delimiter.len();
    }
}

/// Whether a part's headers name it `model`.
fn is_model(head: &[u8]) -> bool {
    String::from_utf8_lossy(head).lines().any(|line| {
        let Some((name, value)) = line.split_once(':') else {
            return false;
        };
        name.trim().eq_ignore_ascii_case("content-disposition")
            && value
                .split(';')
                .any(|p| p.trim() == "name=\"model\"" || p.trim() == "name=model")
    })
}

/// The `model` form field of an upload.
pub fn model(body: &[u8], content_type: Option<&str>) -> Result<String, Error> {
    let range = model_range(body, content_type)?;
    let model = std::str::from_utf8(&body[range])
        .map_err(|_| Error::InvalidUpload("the model field is not UTF-8".into()))?;
    Ok(model.trim().to_string())
}

/// The upload with its `model` field set to `deployment`.
pub fn with_model(body: &[u8], content_type: Option<&str>, deployment: &str) -> Vec<u8> {
    match model_range(body, content_type) {
        Ok(range) => [
            &body[..range.start],
            deployment.as_bytes(),
            &body[range.end..],
        ]
        .concat(),
        Err(_) => body.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TYPE: &str = "multipart/form-data; boundary=XyZ";

    fn upload(model: &str) -> Vec<u8> {
        format!(
            "--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF--XyZ\r\n--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n--XyZ\r\nContent-Disposition: form-data; name=\"language\"\r\n\r\nen\r\n--XyZ--\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn the_model_field_is_read_and_replaced() {
        let body = upload("whisper-1");
        assert_eq!(model(&body, Some(TYPE)).unwrap(), "whisper-1");
        assert_eq!(
            model(&body, Some("multipart/form-data; boundary=\"XyZ\"")).unwrap(),
            "whisper-1"
        );
        let renamed = with_model(&body, Some(TYPE), "my-whisper");
        assert_eq!(renamed, upload("my-whisper"));
        assert_eq!(model(&renamed, Some(TYPE)).unwrap(), "my-whisper");
    }

    #[test]
    fn uploads_without_a_model_or_a_boundary_are_refused() {
        let no_model =
            b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nRIFF\r\n--XyZ--\r\n";
        assert_eq!(model(no_model, Some(TYPE)), Err(Error::MissingModel));
        assert!(matches!(
            model(&upload("m"), Some("application/json")),
            Err(Error::InvalidUpload(_))
        ));
        assert!(matches!(
            model(b"--XyZ\r\nbroken", Some(TYPE)),
            Err(Error::InvalidUpload(_))
        ));
    }

    #[test]
    fn a_second_model_field_is_refused() {
        let two = b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--XyZ\r\nContent-Disposition: form-data; name=model\r\n\r\nother\r\n--XyZ--\r\n";
        assert!(matches!(
            model(two, Some(TYPE)),
            Err(Error::InvalidUpload(m)) if m.contains("more than one model")
        ));
    }
}
