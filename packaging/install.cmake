# What `cmake --install` and `cpack -G DEB` put where (included from the top-level CMakeLists).
#   bin/diskferry, bin/diskferryd          (install(TARGETS) in cli/ and daemon/)
#   lib/systemd/system/*.service, *.timer  (ExecStart= names PREFIX/bin)
#   etc/diskferry/diskferry.yaml           (/etc/diskferry with the prefix /usr, as in the .deb)
#   share/doc/diskferry/                   README, docs, the example config
set(DISKFERRY_UNITS
  diskferryd.service diskferry-nightly.service diskferry-nightly.timer
  diskferry-enqueue@.service diskferry-enqueue@.timer diskferry-verify.service
  diskferry-verify.timer)
foreach(unit IN LISTS DISKFERRY_UNITS)
  install(FILES ${CMAKE_SOURCE_DIR}/systemd/${unit} DESTINATION lib/systemd/system)
endforeach()
# The units name /usr/bin (the package's prefix); another prefix gets its own paths. Decided at
# install time, because cpack installs with its own prefix.
install(CODE [[
  if(NOT CMAKE_INSTALL_PREFIX STREQUAL "/usr")
    file(GLOB _units "$ENV{DESTDIR}${CMAKE_INSTALL_PREFIX}/lib/systemd/system/diskferry*")
    foreach(_u IN LISTS _units)
      file(READ "${_u}" _text)
      string(REPLACE "/usr/bin/" "${CMAKE_INSTALL_PREFIX}/bin/" _text "${_text}")
      string(REPLACE " /etc/diskferry/" " ${CMAKE_INSTALL_PREFIX}/etc/diskferry/" _text "${_text}")
      string(REPLACE "/usr/share/doc/" "${CMAKE_INSTALL_PREFIX}/share/doc/" _text "${_text}")
      file(WRITE "${_u}" "${_text}")
    endforeach()
  endif()
]])
# /usr/etc is not a place anyone looks: with the prefix /usr the configuration goes to /etc
# (as GNUInstallDirs does), else to PREFIX/etc.
install(CODE "set(DISKFERRY_EXAMPLE_CONFIG \"${CMAKE_SOURCE_DIR}/configs/diskferry.yaml\")")
install(CODE [[
  if(CMAKE_INSTALL_PREFIX STREQUAL "/usr")
    set(_etc "/etc/diskferry")
  else()
    set(_etc "${CMAKE_INSTALL_PREFIX}/etc/diskferry")
  endif()
  # 0640: its hook and notify commands are where tokens end up (check-config warns otherwise).
  file(INSTALL DESTINATION "${_etc}" TYPE FILE PERMISSIONS OWNER_READ OWNER_WRITE GROUP_READ
       FILES "${DISKFERRY_EXAMPLE_CONFIG}")
]])
install(FILES ${CMAKE_SOURCE_DIR}/README.md ${CMAKE_SOURCE_DIR}/docs/operations.md
              ${CMAKE_SOURCE_DIR}/docs/architecture.md ${CMAKE_SOURCE_DIR}/docs/formats.md
        DESTINATION share/doc/diskferry)
install(FILES ${CMAKE_SOURCE_DIR}/configs/diskferry.yaml
        DESTINATION share/doc/diskferry/examples)

# cpack -G DEB (run in the build directory): diskferry_VERSION_ARCH.deb.
set(CPACK_PACKAGE_NAME diskferry)
set(CPACK_PACKAGE_VENDOR "diskferry")
set(CPACK_PACKAGE_CONTACT "diskferry maintainers <root@localhost>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY
    "VM disk backups as qcow2/VHDX streamed to SFTP (daemon, CLI, systemd timers)")
string(CONCAT CPACK_PACKAGE_DESCRIPTION
    "diskferryd snapshots VM disks with reflinks, converts them to qcow2, VHDX or raw with\n"
    "optional compression and streams them to SFTP servers such as a Hetzner Storage Box,\n"
    "with a SQLite job queue, retries, resume and retention. Nothing is enabled on install.")
# Installed with DESTDIR and the prefix /usr, so the rules above see the real prefix and /etc
# lands in the package's /etc.
set(CPACK_SET_DESTDIR ON)
set(CPACK_INSTALL_PREFIX /usr)
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_STRIP_FILES ON)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_SECTION admin)
set(CPACK_DEBIAN_PACKAGE_PRIORITY optional)
# Depends from the binaries' ELF dependencies (dpkg-shlibdeps): the Debian 12 library packages.
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
set(CPACK_DEBIAN_PACKAGE_RECOMMENDS "zstd, qemu-utils, openssh-client")
set(CPACK_DEBIAN_PACKAGE_SUGGESTS "prometheus-node-exporter")
set(CPACK_DEBIAN_PACKAGE_CONTROL_EXTRA
    ${CMAKE_SOURCE_DIR}/packaging/debian/postinst ${CMAKE_SOURCE_DIR}/packaging/debian/prerm
    ${CMAKE_SOURCE_DIR}/packaging/debian/postrm ${CMAKE_BINARY_DIR}/packaging/conffiles)
set(CPACK_DEBIAN_PACKAGE_CONTROL_STRICT_PERMISSION ON)
file(WRITE ${CMAKE_BINARY_DIR}/packaging/conffiles "/etc/diskferry/diskferry.yaml\n")
include(CPack)
